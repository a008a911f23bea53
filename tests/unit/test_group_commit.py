"""The group committer on its own: every request runs once, batches never overlap, a failing
batch wakes its callers and the next calls still run."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

from server.usecases.group_commit import GroupCommitter


class Recorder:
    def __init__(self, *, seconds: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.overlapped = False
        self._seconds = seconds
        self._fail_on = fail_on
        self._lock = threading.Lock()

    def run(self, requests: Sequence[list[int]]) -> None:
        with self._lock:
            self.running += 1
            self.overlapped |= self.running > 1
        try:
            time.sleep(self._seconds)  # a commit: the next batch gathers meanwhile
            numbers = [request[0] for request in requests]
            if self._fail_on in numbers:
                raise RuntimeError("the batch failed")
            for request in requests:
                request.append(len(self.batches))  # the outcome, as the service records it
            self.batches.append(numbers)
        finally:
            with self._lock:
                self.running -= 1


def submit_all(committer: GroupCommitter[list[int]], requests: list[list[int]]) -> None:
    """Every request from its own coroutine, all in flight at once, as the server's calls are."""

    async def all_in_flight() -> None:
        await asyncio.gather(*(committer.submit(request) for request in requests))

    asyncio.run(all_in_flight())


def test_concurrent_calls_share_batches_that_never_overlap() -> None:
    recorder = Recorder(seconds=0.002)
    committer: GroupCommitter[list[int]] = GroupCommitter(recorder.run)
    requests = [[n] for n in range(400)]
    submit_all(committer, requests)
    committer.stop()
    assert sorted(n for batch in recorder.batches for n in batch) == list(range(400))
    assert all(len(request) == 2 for request in requests), "every call returned after its batch"
    assert not recorder.overlapped
    assert len(recorder.batches) < 200, "calls that arrived during a commit shared the next one"


def test_batches_are_capped() -> None:
    recorder = Recorder(seconds=0.005)
    committer: GroupCommitter[list[int]] = GroupCommitter(recorder.run, max_batch=4)
    submit_all(committer, [[n] for n in range(64)])
    committer.stop()
    assert max(len(batch) for batch in recorder.batches) <= 4
    assert sum(len(batch) for batch in recorder.batches) == 64


def test_a_failing_batch_wakes_its_callers_and_later_calls_still_run() -> None:
    recorder = Recorder(seconds=0.002, fail_on=0)
    committer: GroupCommitter[list[int]] = GroupCommitter(recorder.run)
    failed = [0]
    submit_all(committer, [failed])  # the committer survives; the call finds no outcome
    assert failed == [0]
    requests = [[n] for n in range(1, 50)]
    submit_all(committer, requests)
    committer.stop()
    assert sorted(n for batch in recorder.batches for n in batch) == list(range(1, 50))
