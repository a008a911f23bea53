"""The server's threads, named for the operating system too.

CPython 3.11 keeps a thread's name to itself, so `top -H`, `ps -L` and
/proc/PID/task/*/comm show every thread as "python" (or as the thread that
started it: a new thread inherits its creator's name). Each thread the server
starts calls `name_os_thread` first, and `name_grpc_poller` renames the thread
grpc.aio starts for itself; the benchmark reads the names back to report CPU
per call for each thread (benchmarks/load.py).
"""

from __future__ import annotations

import contextlib
import threading

_MAX_BYTES = 15  # the kernel keeps 16 bytes, the last one NUL


def name_os_thread() -> None:
    """Gives the calling thread its Python name at the OS level too (Linux: /proc)."""
    thread = threading.current_thread()
    _set_os_name(thread, thread.name)


def name_grpc_poller() -> None:
    """Names grpc.aio's completion-queue poller (a Python thread running `_poll_wrapper`,
    started from the event loop's thread, whose name it would otherwise show)."""
    for thread in threading.enumerate():
        if "_poll_wrapper" in thread.name:
            _set_os_name(thread, "grpc-poller")


def _set_os_name(thread: threading.Thread, name: str) -> None:
    if thread.native_id is None:
        return
    # A name is a convenience: never a reason to stop (no /proc, a thread that just ended).
    path = f"/proc/self/task/{thread.native_id}/comm"
    with contextlib.suppress(OSError), open(path, "w") as comm:
        comm.write(name.encode("ascii", "replace")[:_MAX_BYTES].decode())
