"""Group commit: concurrent calls share one transaction, so one commit (one fsync) serves many.

Worker threads submit requests and block; a single committer thread takes
everything queued, runs it as one batch, commits, and only then wakes the
submitters. Nothing is acknowledged before it is durable, and while one batch
commits the next one gathers by itself, so there is no timer to tune.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

R = TypeVar("R")

log = logging.getLogger(__name__)

_STOP = object()


class GroupCommitter(Generic[R]):
    def __init__(self, run_batch: Callable[[Sequence[R]], None], *, max_batch: int = 256) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[R, threading.Lock] | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="group-commit", daemon=True)
        self._thread.start()

    def submit(self, request: R) -> None:
        """Runs the request in the next batch and returns once that batch has committed."""
        # A lock taken here and released by the committer: a fraction of an Event's cost.
        done = threading.Lock()
        done.acquire()
        self._queue.put((request, done))
        done.acquire()

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
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
            entries: list[tuple[R, threading.Lock]] = batch  # type: ignore[assignment]
            try:
                self._run_batch([request for request, _ in entries])
            except Exception:
                # A bug in the batch: its calls find no outcome and fail; the committer
                # must live on, or every later call would wait forever.
                log.exception("a group-commit batch raised")
            finally:
                # run_batch records each request's outcome on the request itself.
                for _, done in entries:
                    done.release()
            if stopping:
                return
