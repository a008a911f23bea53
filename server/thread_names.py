"""The server's threads, named for the operating system too.

CPython 3.11 keeps a thread's name to itself, so `top -H`, `ps -L` and
/proc/PID/task/*/comm show every thread as "python". Each thread the server
starts calls `name_os_thread` first; the benchmark reads the names back to
report CPU per call for each thread (benchmarks/load.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading

_PR_SET_NAME = 15  # linux/prctl.h
_MAX_BYTES = 15  # the kernel keeps 16 bytes, the last one NUL


def name_os_thread() -> None:
    """Gives the calling thread its Python name at the OS level too (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    name = threading.current_thread().name.encode("ascii", "replace")[:_MAX_BYTES]
    # A name is a convenience: never a reason to stop a thread.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
