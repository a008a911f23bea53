"""Watches whether the database answers, so health can report NOT_SERVING while it does not.

A background thread runs `SELECT 1` on a connection of its own (never queued
behind busy calls) every `interval` seconds, and at once when a call has just
failed with a database outage (`check_now`). Each change is reported to the
`report(serving)` given to `start`; the thread stops with `stop()`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import exc as sa_exc

from server.db.engine import make_engine
from server.thread_names import name_os_thread

log = logging.getLogger(__name__)

PROBE_INTERVAL_SECONDS = 1.0


class DatabaseProbe:
    def __init__(self, database_url: str, *, interval: float = PROBE_INTERVAL_SECONDS) -> None:
        # One connection, a short statement timeout: a probe never waits for long.
        self._engine = make_engine(database_url, pool_size=1, statement_timeout_ms=2000)
        self._report: Callable[[bool], None] = lambda serving: None
        self._interval = interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._serving: bool | None = None
        self._thread = threading.Thread(target=self._loop, name="kms-db-probe", daemon=True)

    def start(self, report: Callable[[bool], None]) -> None:
        self._report = report
        self._thread.start()

    def check_now(self) -> None:
        """A call just met a database outage: probe without waiting for the next tick."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._engine.dispose()

    def probe(self) -> bool:
        try:
            with self._engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
        except (sa_exc.DBAPIError, sa_exc.TimeoutError) as error:
            if self._serving is not False:
                cause = error.orig if isinstance(error, sa_exc.DBAPIError) else error
                log.warning("database unreachable: %s", str(cause).strip()[:200])
            return False
        return True

    def _loop(self) -> None:
        name_os_thread()
        while not self._stopping.is_set():
            serving = self.probe()
            if self._stopping.is_set():
                break
            if serving != self._serving:
                if serving and self._serving is not None:
                    log.info("database reachable again")
                self._serving = serving
                self._report(serving)
            self._wake.wait(self._interval)
            self._wake.clear()
