"""Runs a program and prints its wall time, peak RSS and CPU time as JSON on stdout.

    python -S -m benchmarks.rusage PROGRAM ARGS...

Why a wrapper: on Linux a child's `ru_maxrss` includes the resident size of
the process it was forked from (before `exec`), so a program started straight
from the benchmark (over 100 MiB resident) would inherit that figure. Forked
from this small interpreter instead, only the program's own peak shows. The
program's stdout goes to /dev/null; its stderr is passed through.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    command = sys.argv[1:]
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: becomes the program
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - started,
                "max_rss_kib": usage.ru_maxrss,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "returncode": os.waitstatus_to_exitcode(status),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
