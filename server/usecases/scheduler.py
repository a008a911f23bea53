"""The lifecycle scheduler: each replica's thread that carries out what falls due.

What falls due is in the database (a destruction's due time, a key's next rotation), so
every replica looks, a server that was down catches up at its next start, and the work
itself makes sure only one replica does each thing (row locks, state read again). The
thread sleeps until the earliest due time the database knows of, within bounds, and is
woken when this replica schedules something.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from server.db.repository import Repository
from server.thread_names import name_os_thread
from server.usecases.transactions import DATABASE_ERRORS, Transactions, now_us

log = logging.getLogger(__name__)

LONGEST_WAIT_SECONDS = 30.0
DEV_LONGEST_WAIT_SECONDS = 2.0
SHORTEST_WAIT_SECONDS = 0.005  # past the due time, so the pass finds it due
PAST_DUE_WAIT_SECONDS = 1.0


class Scheduler:
    def __init__(self, transactions: Transactions, *, dev: bool = False) -> None:
        self._tx = transactions
        # An idle server looks once per longest wait (30 s; 2 s in dev mode).
        self._longest = DEV_LONGEST_WAIT_SECONDS if dev else LONGEST_WAIT_SECONDS
        self._passes: list[Callable[[], int]] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add_pass(self, carry_out_due: Callable[[], int]) -> None:
        """Something to run at every pass (it returns how many things it did)."""
        self._passes.append(carry_out_due)

    def start(self) -> None:
        """Carries out what is already due, then keeps looking in a thread of its own."""
        if self._thread is not None:
            return
        self._pass()
        self._thread = threading.Thread(target=self._loop, name="kms-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def wake(self) -> None:
        """Something was scheduled here: look again now (other replicas' changes are seen
        within the longest wait)."""
        self._wake.set()

    def _loop(self) -> None:
        name_os_thread()
        while not self._stop.is_set():
            self._wake.wait(self._seconds_to_next())
            self._wake.clear()
            if not self._stop.is_set():
                self._pass()

    def _seconds_to_next(self) -> float:
        """Until the next due destruction or rotation the database knows of, within bounds."""
        try:
            with self._tx.sessions() as session:
                due = Repository(session, self._tx.integrity).next_due()
        except DATABASE_ERRORS:
            return self._longest
        if due is None:
            return self._longest
        left = (due - now_us()) / 1e6
        if left <= 0:
            # Due and still there after a pass: refused, failed, or due just now. Again soon,
            # but not in a busy loop.
            return min(self._longest, PAST_DUE_WAIT_SECONDS)
        return min(self._longest, left + SHORTEST_WAIT_SECONDS)

    def _pass(self) -> None:
        for carry_out_due in self._passes:
            try:
                carry_out_due()
            except Exception:  # a bug: keep the scheduler alive, loudly
                log.exception("the lifecycle scheduler's pass failed")
