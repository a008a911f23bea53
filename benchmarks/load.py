"""A closed-loop load generator over the grpc futures API, and process CPU accounting.

One client process, one channel: `in_flight` calls are kept outstanding with
`stub.Method.future(...)`; each completion frees a slot for the next call.
The same generator drives the echo baseline and kms-server, so the client's
own cost is the same on both sides of every ratio.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Makes the future of call number i (each call gets its own request).
CallFactory = Callable[[int], "grpc.Future[Any]"]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        text = stat.read().decode()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU time of this process, all threads (the client side of the load)."""
    times = os.times()
    return times.user + times.system


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class LoadResult:
    in_flight: int
    calls: int
    errors: int
    seconds: float
    latencies: list[float]
    server_cpu_seconds: float
    client_cpu_seconds: float
    issued: int = 0
    first_error: str = ""

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, float | int | str]:
        calls = max(self.calls, 1)
        return {
            "in_flight": self.in_flight,
            "calls": self.calls,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "calls_per_s": round(self.throughput, 1),
            "p50_ms": round(percentile(self.latencies, 0.50) * 1000, 3),
            "p99_ms": round(percentile(self.latencies, 0.99) * 1000, 3),
            "server_cpu_us_per_call": round(self.server_cpu_seconds / calls * 1e6, 1),
            "server_cpu_cores": round(self.server_cpu_seconds / self.seconds, 2),
            "client_cpu_us_per_call": round(self.client_cpu_seconds / calls * 1e6, 1),
            "client_cpu_cores": round(self.client_cpu_seconds / self.seconds, 2),
            "first_error": self.first_error,
        }


def closed_loop(
    make_call: CallFactory,
    *,
    in_flight: int,
    duration: float,
    warmup: float,
    server_pid: int,
    first_index: int = 0,
) -> LoadResult:
    """Keeps `in_flight` calls outstanding for `warmup` then `duration` seconds.

    Only the calls issued after the warm-up count; the measured window ends
    when the last of them has completed. Server CPU is read from /proc around
    the measured window, so it is per measured call.
    """
    slots = threading.Semaphore(in_flight)
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    first_error = [""]
    recording = [False]
    index = first_index

    def issue(i: int) -> None:
        record = recording[0]
        start = time.perf_counter()
        future = make_call(i)

        def done(finished: grpc.Future[Any]) -> None:
            elapsed = time.perf_counter() - start
            error = finished.exception()
            if record:
                with lock:
                    if error is None:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1
                        if not first_error[0]:
                            first_error[0] = str(error)[:300]
            slots.release()

        future.add_done_callback(done)

    warm_until = time.perf_counter() + warmup
    while time.perf_counter() < warm_until:
        slots.acquire()
        issue(index)
        index += 1
    # Drain the warm-up calls so the measured window starts clean.
    for _ in range(in_flight):
        slots.acquire()
    for _ in range(in_flight):
        slots.release()

    recording[0] = True
    server_before = process_cpu_seconds(server_pid)
    client_before = own_cpu_seconds()
    started = time.perf_counter()
    stop_at = started + duration
    while time.perf_counter() < stop_at:
        slots.acquire()
        issue(index)
        index += 1
    for _ in range(in_flight):
        slots.acquire()
    seconds = time.perf_counter() - started
    server_cpu = process_cpu_seconds(server_pid) - server_before
    client_cpu = own_cpu_seconds() - client_before
    for _ in range(in_flight):
        slots.release()
    return LoadResult(
        in_flight=in_flight,
        calls=len(latencies),
        errors=errors[0],
        seconds=seconds,
        latencies=latencies,
        server_cpu_seconds=server_cpu,
        client_cpu_seconds=client_cpu,
        issued=index - first_index,
        first_error=first_error[0],
    )
