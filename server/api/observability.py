"""What operators see: Prometheus metrics, one JSON log line per call, request ids.

`CallObserver` is the outermost layer of every unary method (see
`server.api.pipeline`), so it sees every call's final status, including
`UNAUTHENTICATED` from authentication. It never looks at requests or
responses, only at the method, the status, the AIP-193 reason and who called:
nothing it records can hold key material or credentials.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import queue
import re
import select
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.api.errors import CallAborted
from server.keystore.crypto import random_bytes
from server.thread_names import name_os_thread

log = logging.getLogger(__name__)
call_log = logging.getLogger("kms.call")

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class CallInfo:
    """What one call learns about itself as it goes; authentication fills in the actor."""

    method: str
    request_id: str
    actor: str = "anonymous"
    # The call's invocation metadata, read once (grpc.aio builds it anew at each read);
    # it holds the bearer token, so never in a repr.
    metadata: Iterable[tuple[str, Any]] = field(default=(), repr=False)


CURRENT_CALL: contextvars.ContextVar[CallInfo] = contextvars.ContextVar("kms_call")

# What a unary method handler runs on grpc.aio: (request, context) -> awaitable response.
Behaviour = Callable[[Any, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[Any]]


class Metrics:
    """The server's metrics, in a registry of its own (several servers may share a process)."""

    def __init__(self, active_versions: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = Counter(
            "kms_calls",
            "Calls answered, by method and gRPC status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kms_call_duration_seconds",
            "Time to answer a call, by method",
            ["method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.rotations = Counter(
            "kms_rotations",
            "Rotations of a key's active version that committed",
            registry=self.registry,
        )
        self.denials = Counter(
            "kms_denials",
            "Calls refused as UNAUTHENTICATED or PERMISSION_DENIED (or rate-limited for failing "
            "authentication), by reason",
            ["code", "reason"],
            registry=self.registry,
        )
        self.audit_write_failures = Counter(
            "kms_audit_write_failures",
            "Calls refused because their audit event could not be written",
            registry=self.registry,
        )
        self.integrity_failures = Counter(
            "kms_integrity_failures",
            "Calls that met stored data failing its integrity check (DATA_LOSS)",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(ActiveVersionCollector(active_versions))
        # Each (method, status)'s counter and histogram child, looked up once.
        self._children: dict[tuple[str, grpc.StatusCode], tuple[Counter, Histogram]] = {}
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe(self, method: str, code: grpc.StatusCode, reason: str, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        children = self._children.get((name, code))
        if children is None:
            # labels() checks and locks on every call: a third of an observation's cost.
            children = self.calls.labels(name, code.name), self.latency.labels(name)
            self._children[(name, code)] = children
        calls, latency = children
        calls.inc()
        latency.observe(seconds)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or (
            reason == "UNAUTHENTICATED_RATE_LIMITED"  # refused unaudited: counted here
        ):
            self.denials.labels(code.name, reason or "UNKNOWN").inc()
        elif code == grpc.StatusCode.DATA_LOSS:
            self.integrity_failures.labels(reason or "UNKNOWN").inc()
        elif reason == "AUDIT_UNAVAILABLE":
            self.audit_write_failures.inc()
        elif code == grpc.StatusCode.OK and name == "RotateActive":
            self.rotations.inc()

    def serve(self, listen: str) -> int:
        """Serves /metrics over HTTP on host:port (port 0 picks one); returns the port."""
        host, _, port = listen.rpartition(":")
        self._http, self._thread = start_http_server(
            int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry
        )
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class ActiveVersionCollector(Collector):
    """Reads each key's active version from the database at scrape time (one small query).

    Always right, even with several replicas rotating: nothing is cached in the process.
    """

    def __init__(self, active_versions: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._active_versions = active_versions

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("kms_key_active_version", "The active version of each key")]

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "kms_key_active_version", "The active version of each key (0: none)", labels=["key"]
        )
        try:
            for key_name, version in self._active_versions():
                gauge.add_metric([key_name], version)
        except Exception as error:  # a scrape must not fail because the database is down
            log.warning("metrics: cannot read active versions: %s", type(error).__name__)
        yield gauge


class CallLog(Protocol):
    """Where the one line per call goes (`kms.call`, at INFO)."""

    def write(self, call: CallInfo, status: str, reason: str, seconds: float, peer: str) -> None:
        """Writes the line of a call that ended with this status."""


class LoggingCallLog:
    """The line as a `logging` record of `kms.call`, through whatever handlers are configured."""

    def write(self, call: CallInfo, status: str, reason: str, seconds: float, peer: str) -> None:
        # What call_log.info(...) does, without looking up the caller's frame.
        record = call_log.makeRecord(
            call_log.name,
            logging.INFO,
            __file__,
            0,
            "%s %s %s",
            (call.method, status, call.actor),
            None,
            "write",
            {"call": _call_fields(call, status, reason, seconds, peer)},
        )
        call_log.handle(record)


class JsonCallLog:
    """The line as JsonFormatter would write it, built here and queued as text on a LogWriter.

    What kms-server uses with JSON logs (server/main.py): a call's line skips the logging
    record, its handlers and its formatter. The text is assembled from a per-method
    template, with only the per-call strings escaped (as `json` escapes them): the same
    bytes `json` would make of the entry, at a fraction of the cost of encoding a dict.
    """

    def __init__(self, writer: LogWriter) -> None:
        self._lines = writer.records
        self._clock = _UtcClock()
        # method -> (the text after the time up to the message's status, the text after
        # the message's actor up to the actor field)
        self._templates: dict[str, tuple[str, str]] = {}

    def write(self, call: CallInfo, status: str, reason: str, seconds: float, peer: str) -> None:
        method = call.method
        template = self._templates.get(method)
        if template is None:
            template = self._templates[method] = _call_line_template(method)
        head, middle = template
        status_text, actor_text = _escape(status)[1:-1], _escape(call.actor)[1:-1]
        # Keys and order as _call_fields and JsonFormatter: time, level, logger, message,
        # method, actor, status, reason, duration_ms, request_id, peer.
        self._lines.put(
            f'{{"time": "{self._clock.format(time.time())}"{head}{status_text} {actor_text}'
            f'{middle}"{actor_text}", "status": "{status_text}", "reason": {_escape(reason)}, '
            f'"duration_ms": {float.__repr__(round(seconds * 1000, 3))}, '
            f'"request_id": {_escape(call.request_id)}, "peer": {_escape(peer)}}}'
        )


def _call_line_template(method: str) -> tuple[str, str]:
    """The fixed parts of a method's call line: level, logger, the message's start, method."""
    escaped = _escape(method)
    head = f', "level": "INFO", "logger": {_escape(call_log.name)}, "message": "{escaped[1:-1]} '
    return head, f'", "method": {escaped}, "actor": '


def _call_fields(
    call: CallInfo, status: str, reason: str, seconds: float, peer: str
) -> dict[str, Any]:
    return {
        "method": call.method,
        "actor": call.actor,
        "status": status,
        "reason": reason,
        "duration_ms": round(seconds * 1000, 3),
        "request_id": call.request_id,
        "peer": peer,
    }


class CallObserver:
    """One metrics observation and one log line per call; the request id in trailing metadata."""

    def __init__(self, metrics: Metrics | None, call_lines: CallLog | None = None) -> None:
        self._metrics = metrics
        self._call_lines = call_lines or LoggingCallLog()

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        """`behaviour` observed: whatever it returns or raises, the call is counted and logged."""
        finish = self._finish

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = context.invocation_metadata() or ()
            call = CallInfo(method, _request_id(metadata), metadata=metadata)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, call.request_id),))
            token = CURRENT_CALL.set(call)
            started = time.perf_counter()
            failure: BaseException | None = None
            refusal: CallAborted | None = None
            try:
                return await behaviour(request, context)
            except CallAborted as raised:
                refusal = raised
                _take_status(context, refusal)
            except BaseException as error:
                failure = error
                raise
            finally:
                CURRENT_CALL.reset(token)
                finish(call, context, started, failure)
            # Counted and logged: now the client may learn the outcome.
            await context.abort(refusal.code, refusal.details, context.trailing_metadata())

        return observed

    def _finish(
        self,
        call: CallInfo,
        context: grpc.aio.ServicerContext[Any, Any],
        started: float,
        failure: BaseException | None,
    ) -> None:
        seconds = time.perf_counter() - started
        code = context.code()
        if not isinstance(code, grpc.StatusCode):
            # Nothing set a status: a return is OK, an escaped exception becomes UNKNOWN.
            code = grpc.StatusCode.OK if failure is None else grpc.StatusCode.UNKNOWN
        reason = _reason(context.trailing_metadata() or ())
        if self._metrics is not None:
            self._metrics.observe(call.method, code, reason, seconds)
        if failure is not None and code == grpc.StatusCode.UNKNOWN:
            log.error(
                "unexpected error in %s: %s", call.method, type(failure).__name__, exc_info=failure
            )
        if call_log.isEnabledFor(logging.INFO):  # else no line is built for nothing
            self._call_lines.write(call, code.name, reason, seconds, context.peer())


def _take_status(context: grpc.aio.ServicerContext[Any, Any], refusal: CallAborted) -> None:
    context.set_code(refusal.code)
    context.set_details(refusal.details)
    kept = tuple(context.trailing_metadata() or ())
    context.set_trailing_metadata((*kept, *refusal.trailing_metadata))


def _request_id(metadata: Iterable[tuple[str, Any]]) -> str:
    for key, value in metadata:
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            if _SANE_REQUEST_ID.fullmatch(value):
                return value
            break
    return random_bytes(16).hex()  # as uuid4().hex, without a GIL release of its own


def _reason(trailing: Iterable[tuple[str, Any]]) -> str:
    """The AIP-193 ErrorInfo reason from the status details an abort put in trailing metadata."""
    for key, value in trailing:
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:
            return ""
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return str(info.reason)
    return ""


def current_request_id() -> str:
    call = CURRENT_CALL.get(None)
    return call.request_id if call is not None else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the call's fields if any."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _UtcClock()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._clock.format(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        call = getattr(record, "call", None)
        if isinstance(call, dict):
            entry.update(call)
        else:
            # Set by CallQueueHandler on the calling thread; else this thread's call.
            request_id = getattr(record, "request_id", None) or current_request_id()
            if request_id:
                entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return _JSON.encode(entry)


_JSON = json.JSONEncoder(ensure_ascii=True, default=str)
# A str as _JSON writes it, quotes included (its C escaper); the "a b" of a message is
# the escapes of "a" and "b" joined, as JSON escapes character by character.
_escape = json.encoder.encode_basestring_ascii


class _UtcClock:
    """Timestamps as 2026-01-31T12:00:00.123Z, the second's text kept: lines come many to
    a second."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def format(self, created: float) -> str:
        whole = int(created)
        second = self._second
        if second[0] != whole:
            second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
            self._second = second
        return f"{second[1]}.{int((created - whole) * 1000):03d}Z"


class CallQueueHandler(logging.handlers.QueueHandler):
    """Enqueues records for a LogWriter's thread to format and write.

    What belongs to the calling thread is captured here: the message with its
    arguments, the traceback as text, and the request id of the call in progress.
    """

    def handle(self, record: logging.LogRecord) -> bool:
        """Handler.handle without the handler's lock: `prepare` only touches the record
        and the queue is thread-safe, so request threads never wait on one another here."""
        accepted = self.filter(record)
        if isinstance(accepted, logging.LogRecord):  # Python 3.12+: a filter may replace it
            record = accepted
        if accepted:
            self.emit(record)
        return bool(accepted)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.message = record.getMessage()
        record.msg, record.args = record.message, None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return record


class LogWriter:
    """The one thread that formats and writes what request threads queue (CallQueueHandler).

    It takes everything queued at once (up to MAX_BATCH records), writes the lines in as
    few writes as it can, each followed by a flush, then pauses for LINGER_SECONDS: under
    load one wake-up and a few system calls serve dozens of lines instead of one each, and
    a line waits at most about that long. `stop` writes what is still queued, then ends
    the thread.
    """

    MAX_BATCH = 1000
    LINGER_SECONDS = 0.01
    # A write of at most PIPE_BUF bytes to a pipe is atomic: lines of several processes
    # sharing one stderr pipe never interleave mid-line (a longer line goes on its own).
    CHUNK_BYTES = select.PIPE_BUF

    def __init__(self, handler: logging.StreamHandler[Any]) -> None:
        # Records to format, or lines already formatted (JsonCallLog); None stops the thread.
        self.records: queue.SimpleQueue[logging.LogRecord | str | None] = queue.SimpleQueue()
        self._handler = handler
        self._thread = threading.Thread(target=self._run, name="kms-log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.records.put(None)
            self._thread.join()

    def _run(self) -> None:
        name_os_thread()
        while True:
            batch, stopping = self._drain()
            if batch:
                self._write(batch)
            if stopping:
                return
            time.sleep(self.LINGER_SECONDS)

    def _drain(self) -> tuple[list[logging.LogRecord | str], bool]:
        """What is queued (waiting for a first record), and whether `stop` was called."""
        batch: list[logging.LogRecord | str] = []
        record = self.records.get()
        while record is not None:
            batch.append(record)
            if len(batch) >= self.MAX_BATCH:
                return batch, False
            try:
                record = self.records.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _write(self, batch: list[logging.LogRecord | str]) -> None:
        handler = self._handler
        chunk: list[str] = []
        size = 0
        for record in batch:
            if isinstance(record, str):
                line = record + handler.terminator
            else:
                try:
                    if not handler.filter(record):
                        continue
                    line = handler.format(record) + handler.terminator
                except Exception:
                    handler.handleError(record)
                    continue
            length = len(line) if line.isascii() else len(line.encode(errors="replace"))
            if chunk and size + length > self.CHUNK_BYTES:
                self._emit(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += length
        if chunk:
            self._emit(chunk)

    def _emit(self, lines: list[str]) -> None:
        try:
            self._handler.stream.write("".join(lines))
            self._handler.flush()
        except Exception:
            # logging's own report of a failed write (to stderr, if it can), then carry on.
            self._handler.handleError(logging.makeLogRecord({"msg": "cannot write log lines"}))
