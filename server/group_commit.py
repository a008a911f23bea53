"""Group commit: concurrent calls share one transaction, so one commit (one fsync) serves many.

Leader and followers, no thread of its own: a call that finds no batch running
runs one itself (the leader), with every call queued so far; calls arriving
meanwhile queue up and wait. When its batch has committed the leader wakes the
calls it ran, and hands the lead to the first call still queued, whose batch
then takes everything that gathered in the meantime. Nothing is acknowledged
before it is durable; a lone call runs on its own thread, with no hand-off; and
under load batches grow by themselves, so there is no timer to tune.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

R = TypeVar("R")


class _Waiter(Generic[R]):
    __slots__ = ("leads", "request", "wake")

    def __init__(self, request: R) -> None:
        self.request = request
        # Taken here, released by whoever wakes this call: a fraction of an Event's cost.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.leads = False  # woken to run the next batch, not because its batch committed


class GroupCommitter(Generic[R]):
    def __init__(self, run_batch: Callable[[Sequence[R]], None], *, max_batch: int = 256) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._mutex = threading.Lock()
        self._queued: list[_Waiter[R]] = []
        self._leader_running = False

    def submit(self, request: R) -> None:
        """Runs the request in a batch and returns once that batch has committed."""
        waiter = _Waiter(request)
        with self._mutex:
            self._queued.append(waiter)
            follows = self._leader_running
            self._leader_running = True
        if follows:
            waiter.wake.acquire()
            if not waiter.leads:
                return  # its batch committed
        self._lead()

    def _lead(self) -> None:
        # The leader is the first queued call, so its own request is in this batch.
        with self._mutex:
            batch = self._queued[: self._max_batch]
            del self._queued[: self._max_batch]
        try:
            # In an empty context: what the batch logs belongs to no one call's request id.
            contextvars.Context().run(self._run_batch, [waiter.request for waiter in batch])
        finally:
            # run_batch records each request's outcome on the request itself.
            for waiter in batch[1:]:
                waiter.wake.release()
            with self._mutex:
                if self._queued:
                    successor = self._queued[0]
                    successor.leads = True
                    successor.wake.release()
                else:
                    self._leader_running = False
