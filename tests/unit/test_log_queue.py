"""Log records cross to the writer thread with what belongs to the calling thread."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from server.api.observability import (
    CURRENT_CALL,
    CallInfo,
    CallQueueHandler,
    JsonCallLog,
    JsonFormatter,
    LoggingCallLog,
    LogWriter,
)


class _RecordingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def _writer(output: io.StringIO) -> LogWriter:
    handler = logging.StreamHandler(output)
    handler.setFormatter(JsonFormatter())
    return LogWriter(handler)


def _through_the_queue(emit: logging.Logger) -> list[dict[str, object]]:
    output = io.StringIO()
    writer = _writer(output)
    emit.addHandler(CallQueueHandler(writer.records))
    emit.setLevel(logging.INFO)
    emit.propagate = False
    writer.start()
    token = CURRENT_CALL.set(CallInfo("/kms.v1.KeyManagementService/ListKeys", "req-42"))
    try:
        emit.info("listing %d keys", 3)
        try:
            raise ValueError("boom")
        except ValueError:
            emit.exception("failed")
    finally:
        CURRENT_CALL.reset(token)
    emit.info("outside any call")
    writer.stop()  # writes everything queued
    return [json.loads(line) for line in output.getvalue().splitlines()]


def test_a_line_logged_during_a_call_carries_its_request_id_and_traceback() -> None:
    lines = _through_the_queue(logging.getLogger("test.log_queue"))
    assert [line["message"] for line in lines] == ["listing 3 keys", "failed", "outside any call"]
    assert lines[0]["request_id"] == "req-42"
    assert lines[1]["request_id"] == "req-42"
    assert "ValueError: boom" in str(lines[1]["exception"])
    assert "request_id" not in lines[2]


def test_the_writer_writes_what_is_queued_in_order_a_batch_at_a_time() -> None:
    output = _RecordingStream()
    writer = _writer(output)
    emit = logging.getLogger("test.log_queue.batches")
    emit.addHandler(CallQueueHandler(writer.records))
    emit.setLevel(logging.INFO)
    emit.propagate = False
    count = LogWriter.MAX_BATCH * 2 + 5
    long = "x" * LogWriter.CHUNK_BYTES
    for i in range(count):  # queued before the thread starts: it finds them all waiting
        emit.info("line %d", i)
    emit.info(long)
    emit.info("last")
    writer.start()
    writer.stop()
    lines = [json.loads(line) for line in output.getvalue().splitlines()]
    expected = [f"line {i}" for i in range(count)] + [long, "last"]
    assert [line["message"] for line in lines] == expected
    # Few writes, each of whole lines and flushed, at most PIPE_BUF bytes (atomic on a
    # pipe) unless a single line is longer.
    assert len(output.writes) == output.flushes < count / 5
    assert all(w.endswith("\n") for w in output.writes)
    assert [w for w in output.writes if len(w) > LogWriter.CHUNK_BYTES] == [output.writes[-2]]
    assert output.writes[-2].count("\n") == 1


def test_json_time_is_utc_with_milliseconds_across_seconds() -> None:
    formatter = JsonFormatter()
    for created in (1_700_000_000.25, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.0):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        expected = f"{stamp}.{int(record.msecs):03d}Z"
        assert json.loads(formatter.format(record))["time"] == expected


def test_a_json_call_line_is_what_the_formatter_makes_of_the_call_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kms-server writes call lines directly (JsonCallLog); they must read as the logging
    path's (LoggingCallLog, then JsonFormatter) do, key for key and in the same order."""
    call = CallInfo("/kms.v1.KeyManagementService/GetActiveKey", "req-7", actor="backup-1")
    facts = ("PERMISSION_DENIED", "ROLE_REQUIRED", 0.0123456, "ipv4:127.0.0.1:5000")
    with caplog.at_level(logging.INFO, logger="kms.call"):
        LoggingCallLog().write(call, *facts)
    (record,) = [r for r in caplog.records if r.name == "kms.call"]
    expected = json.loads(JsonFormatter().format(record))

    output = io.StringIO()
    writer = _writer(output)
    writer.start()
    JsonCallLog(writer).write(call, *facts)
    writer.stop()
    (line,) = output.getvalue().splitlines()
    written = json.loads(line)

    assert list(written) == list(expected)
    assert {k: v for k, v in written.items() if k != "time"} == {
        k: v for k, v in expected.items() if k != "time"
    }
    assert written["duration_ms"] == 12.346 and written["request_id"] == "req-7"
    assert abs(_epoch(written["time"]) - _epoch(expected["time"])) < 5


def _epoch(stamp: str) -> float:
    whole, _, millis = stamp.rstrip("Z").partition(".")
    return time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000


@pytest.mark.parametrize(
    ("method", "actor", "status", "reason", "seconds", "request_id", "peer"),
    [
        (
            "/kms.v1.KeyManagementService/GetActiveKey",
            "backup-1",
            "OK",
            "",
            0.0123456,
            "0f" * 16,
            "ipv4:127.0.0.1:5000",
        ),
        ("/kms.v1.KeyManagementService/ListKeys", "anonymous", "UNAUTHENTICATED", "X", 0.0, "", ""),
        (
            "/odd\u00e9/M\u00e9thode \U0001f511",
            'qu"ote\\back\nslash\t\u00fcn\u00efc\u00f8de \U0001f600',
            "PERMISSION_DENIED",
            "ROLE_REQUIRED",
            3600.5,
            'req-"7"\x00',
            "unix:/tmp/\x1f\u2028sock",
        ),
        ("/kms.v1.KeyManagementService/RotateActive", "a b", "OK", "", 1e-7, "r", "ipv6:[::1]:1"),
    ],
)
def test_a_json_call_line_is_byte_for_byte_what_the_formatter_writes(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    method: str,
    actor: str,
    status: str,
    reason: str,
    seconds: float,
    request_id: str,
    peer: str,
) -> None:
    """The per-method template escapes only the per-call strings: the text must still be
    exactly the formatter's, whatever a principal name, peer or request id holds."""
    call = CallInfo(method, request_id, actor=actor)
    facts = (status, reason, seconds, peer)
    with caplog.at_level(logging.INFO, logger="kms.call"):
        LoggingCallLog().write(call, *facts)
    (record,) = [r for r in caplog.records if r.name == "kms.call"]
    record.created = 1_700_000_123.456
    expected = JsonFormatter().format(record)

    writer = _writer(io.StringIO())
    call_log = JsonCallLog(writer)
    monkeypatch.setattr(time, "time", lambda: 1_700_000_123.456)
    for _ in range(2):  # the second from the method's cached template
        call_log.write(call, *facts)
        assert writer.records.get_nowait() == expected
