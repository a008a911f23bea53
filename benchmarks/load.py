"""A closed-loop load generator on asyncio, and process CPU accounting.

One client process and one event loop: `in_flight` tasks each keep one call
outstanding, spread round-robin over the channels the call factory uses. The
same generator drives the echo baseline and kms-server on grpc.aio, and
OpenBao through aiohttp on the same loop (benchmarks/openbao.py). (asyncio
rather than grpc's sync futures API: its cost per call does not grow with the
number of channels.)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Starts call number i (each call gets its own request); awaiting it gives the reply.
CallFactory = Callable[[int], Awaitable[Any]]
# What a failed call raises: counted as an error, and the caller goes on.
GRPC_FAILURES: tuple[type[BaseException], ...] = (grpc.aio.AioRpcError,)
T = TypeVar("T")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of its live children (a server started with
    several processes), from /proc/PID/stat (fields 14 and 15)."""
    paths = [f"/proc/{process}/stat" for process in [pid, *_children(pid)]]
    return sum(_cpu_ticks(path) for path in paths) / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU time per thread name (/proc/PID/task/*/comm; kms-server names its
    threads, see server/thread_names.py) over the process and its live children. Numbered
    threads of one pool ("kms-blocking_3") count as one name."""
    totals: dict[str, float] = {}
    for process in [pid, *_children(pid)]:
        try:
            tasks = os.listdir(f"/proc/{process}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{process}/task/{task}/comm") as comm:
                    name = _POOL_SUFFIX.sub("", comm.read().strip())
            except OSError:
                continue  # the thread ended in between
            ticks = _cpu_ticks(f"/proc/{process}/task/{task}/stat")
            totals[name] = totals.get(name, 0.0) + ticks / CLOCK_TICKS
    return totals


def _cpu_ticks(stat_path: str) -> int:
    """utime + stime (fields 14 and 15) of a /proc stat file; 0 if it is gone."""
    try:
        with open(stat_path, "rb") as stat:
            text = stat.read().decode()
    except OSError:
        return 0  # exited in between
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


_POOL_SUFFIX = re.compile(r"_\d+$")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


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
    # Server CPU seconds per thread name over the window (thread_cpu_seconds).
    server_threads_cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
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
            "server_cpu_us_per_call_by_thread": {
                name: round(seconds / calls * 1e6, 1)
                for name, seconds in sorted(
                    self.server_threads_cpu_seconds.items(), key=lambda item: -item[1]
                )
                if seconds > 0
            },
        }


class EventLoop:
    """One asyncio loop for a whole benchmark run: grpc.aio channels belong to the loop
    they were opened on, so channels and load phases all run here."""

    def __init__(self) -> None:
        self._runner = asyncio.Runner()

    def channels(self, address: str, count: int) -> list[grpc.aio.Channel]:
        """`count` channels, each with its own TCP connection (grpc would otherwise share one,
        and the kernel spreads connections, not calls, over a server's processes)."""

        async def open_all() -> list[grpc.aio.Channel]:
            options = [("grpc.use_local_subchannel_pool", 1)]
            return [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]

        return self._runner.run(open_all())

    def run(self, coroutine: Awaitable[T]) -> T:
        """Runs a coroutine on this loop (to open and close other clients on it)."""

        async def wrapper() -> T:
            return await coroutine

        return self._runner.run(wrapper())

    def close(self, channels: list[grpc.aio.Channel]) -> None:
        async def close_all() -> None:
            for channel in channels:
                await channel.close(None)

        self._runner.run(close_all())

    def closed_loop(
        self,
        make_call: CallFactory,
        *,
        in_flight: int,
        duration: float,
        warmup: float,
        server_pid: int,
        first_index: int = 0,
        failures: tuple[type[BaseException], ...] = GRPC_FAILURES,
    ) -> LoadResult:
        """Keeps `in_flight` calls outstanding for `warmup` then `duration` seconds.

        Each of `in_flight` tasks issues its next call as soon as the last one
        returns. The warm-up calls finish before the measured window starts;
        the window ends when the last call started in it has completed. Server
        CPU is read from /proc around the window, so it is per measured call.
        """
        return self._runner.run(
            _closed_loop(make_call, in_flight, duration, warmup, server_pid, first_index, failures)
        )

    def shutdown(self) -> None:
        self._runner.close()


async def _closed_loop(
    make_call: CallFactory,
    in_flight: int,
    duration: float,
    warmup: float,
    server_pid: int,
    first_index: int,
    failures: tuple[type[BaseException], ...],
) -> LoadResult:
    latencies: list[float] = []
    errors = [0]
    first_error = [""]
    issued = [0]
    next_index = itertools.count(first_index)

    async def caller(until: float, record: bool) -> None:
        while time.perf_counter() < until:
            began = time.perf_counter()
            issued[0] += record
            try:
                await make_call(next(next_index))
            except failures as error:
                if record:
                    errors[0] += 1
                    first_error[0] = first_error[0] or str(error)[:300]
                continue
            if record:
                latencies.append(time.perf_counter() - began)

    if warmup > 0:
        until = time.perf_counter() + warmup
        await asyncio.gather(*(caller(until, False) for _ in range(in_flight)))
    server_before = process_cpu_seconds(server_pid)
    threads_before = thread_cpu_seconds(server_pid)
    client_before = own_cpu_seconds()
    started = time.perf_counter()
    await asyncio.gather(*(caller(started + duration, True) for _ in range(in_flight)))
    seconds = time.perf_counter() - started
    server_cpu = process_cpu_seconds(server_pid) - server_before
    threads_after = thread_cpu_seconds(server_pid)
    client_cpu = own_cpu_seconds() - client_before
    return LoadResult(
        in_flight=in_flight,
        calls=len(latencies),
        errors=errors[0],
        seconds=seconds,
        latencies=latencies,
        server_cpu_seconds=server_cpu,
        client_cpu_seconds=client_cpu,
        issued=issued[0],
        first_error=first_error[0],
        server_threads_cpu_seconds={
            name: after - threads_before.get(name, 0.0) for name, after in threads_after.items()
        },
    )
