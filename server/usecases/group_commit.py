"""Group commit: concurrent calls share one transaction, so one commit (one fsync) serves many.

Callers submit requests and wait; a single committer thread takes everything
queued, runs it as one batch, commits, and only then wakes the submitters.
Nothing is acknowledged before it is durable, and while one batch commits the
next one gathers by itself, so there is no timer to tune.

Submitters are coroutines on event loops: the committer wakes each loop once per
batch, not once per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from server.thread_names import name_os_thread

R = TypeVar("R")

log = logging.getLogger(__name__)

_STOP = object()


class GroupCommitter(Generic[R]):
    def __init__(self, run_batch: Callable[[Sequence[R]], None], *, max_batch: int = 256) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        # A request and the future its submitter awaits, or _STOP.
        self._queue: queue.SimpleQueue[tuple[R, asyncio.Future[None]] | object]
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="group-commit", daemon=True)
        self._thread.start()

    async def submit(self, request: R) -> None:
        """Runs the request in the next batch and returns once that batch has committed.

        The event loop serves other calls meanwhile. A caller that goes away (a cancelled
        call) does not take its request out of the batch: it commits all the same.
        """
        done = asyncio.get_running_loop().create_future()
        self._queue.put((request, done))
        await done

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        name_os_thread()
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stopping = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            entries: list[tuple[R, asyncio.Future[None]]] = batch  # type: ignore[assignment]
            try:
                self._run_batch([request for request, _ in entries])
            except Exception:
                # A bug in the batch: its calls find no outcome and fail; the committer
                # must live on, or every later call would wait forever.
                log.exception("a group-commit batch raised")
            finally:
                # run_batch records each request's outcome on the request itself.
                _wake([waiter for _, waiter in entries])
            if stopping:
                return


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for waiter in waiters:
        by_loop.setdefault(waiter.get_loop(), []).append(waiter)
    for loop, futures in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_resolve, futures)


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():  # a cancelled call's future is done already
            future.set_result(None)
