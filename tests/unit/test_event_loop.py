"""The server's event loop (uvloop's) does what the rest of the server relies on."""

from __future__ import annotations

import asyncio
import contextvars
import threading

from server.event_loop import EventLoopThread

CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller")


def test_blocking_work_sees_the_calls_context_and_timers_and_other_threads_reach_the_loop() -> None:
    loop = EventLoopThread(blocking_workers=2)
    try:

        async def call() -> tuple[str, bool, bool]:
            CALLER.set("backup-1")
            # What the pipeline does with a blocking method: the caller goes with it.
            seen = await asyncio.to_thread(CALLER.get)
            fired = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.01, fired.set_result, True)
            woken = asyncio.get_running_loop().create_future()
            # What the group committer does: resolve a future from its own thread.
            threading.Thread(
                target=lambda: loop.loop.call_soon_threadsafe(woken.set_result, True)
            ).start()
            return seen, await fired, await woken

        assert loop.run(call(), timeout=10) == ("backup-1", True, True)
    finally:
        loop.stop()
    assert loop.loop.is_closed()
