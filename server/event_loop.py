"""The event loop the grpc.aio server runs on, in a thread of its own.

The rest of the process stays plain threads: the main thread waits for signals,
the group committer and the database probe have their own, and blocking use
cases run in the loop's default executor. They reach the loop through `run`.

The loop is uvloop's: grpc.aio's dispatching, waking and resuming on it is most of a
data-key call's CPU, and uvloop's loop does that part for less.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import uvloop

from server.thread_names import name_os_thread

T = TypeVar("T")


class EventLoopThread:
    def __init__(self, *, blocking_workers: int, name: str = "kms-event-loop") -> None:
        self.loop = uvloop.new_event_loop()
        # asyncio.to_thread runs here: the use cases that block on the database.
        self.loop.set_default_executor(
            ThreadPoolExecutor(
                max_workers=blocking_workers,
                thread_name_prefix="kms-blocking",
                initializer=name_os_thread,
            )
        )
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        name_os_thread()
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs the coroutine on the loop and returns its result, from any other thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        """Ends the loop once the executor's threads are done; the loop is closed after."""
        if self.loop.is_closed():
            return
        self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
