"""The server's threads carry their names at the OS level (top -H, the benchmark)."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

from server.event_loop import EventLoopThread
from server.thread_names import name_os_thread
from tests.conftest import start_kms

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="/proc/PID/task is Linux's"
)


def _os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_a_thread_takes_its_python_name_cut_to_the_kernels_fifteen_bytes() -> None:
    seen: list[tuple[str, str]] = []  # (before, after)

    def named() -> None:
        before = _os_name(threading.get_native_id())
        name_os_thread()
        seen.append((before, _os_name(threading.get_native_id())))

    for name in ("kms-test", "a-name-longer-than-fifteen-bytes"):
        thread = threading.Thread(target=named, name=name)
        thread.start()
        thread.join()
    assert [after for _, after in seen] == ["kms-test", "a-name-longer-t"]
    assert all(before != after for before, after in seen)


def test_the_event_loop_and_its_blocking_workers_are_named() -> None:
    loop = EventLoopThread(blocking_workers=1)
    try:

        async def names() -> tuple[str, str]:
            worker = await asyncio.to_thread(lambda: _os_name(threading.get_native_id()))
            return _os_name(threading.get_native_id()), worker

        assert loop.run(names()) == ("kms-event-loop", "kms-blocking_0")
    finally:
        loop.stop()


def test_grpc_aios_poller_is_told_apart_from_the_event_loop(tmp_path: Path) -> None:
    kms = start_kms(tmp_path)
    try:
        pollers = [t for t in threading.enumerate() if "_poll_wrapper" in t.name]
        assert pollers, "grpc.aio runs a poller thread"
        assert all(_os_name(t.native_id or 0) == "grpc-poller" for t in pollers)
    finally:
        kms.close()
