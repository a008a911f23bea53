"""SIGTERM, SIGINT and SIGHUP as flags: the handlers only set them, the main thread acts."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("kms-server")


class ServerSignals:
    def __init__(self, stopping_what: str) -> None:
        self.wake = threading.Event()  # set by every signal
        self.stopping = threading.Event()  # SIGTERM or SIGINT
        self.reloading = threading.Event()  # SIGHUP
        self._stopping_what = stopping_what

    def install(self) -> ServerSignals:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGHUP, self._request_reload)
        return self

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, %s", signal.Signals(signum).name, self._stopping_what)
        self.stopping.set()
        self.wake.set()

    def _request_reload(self, _signum: int, _frame: FrameType | None) -> None:
        self.reloading.set()
        self.wake.set()
