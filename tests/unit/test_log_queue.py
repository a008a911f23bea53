"""Log records cross to the writer thread with what belongs to the calling thread."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import queue

from server.api.observability import CURRENT_CALL, CallInfo, CallQueueHandler, JsonFormatter


def _through_the_queue(emit: logging.Logger) -> list[dict[str, object]]:
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    output = io.StringIO()
    writer = logging.StreamHandler(output)
    writer.setFormatter(JsonFormatter())
    listener = logging.handlers.QueueListener(records, writer)
    emit.addHandler(CallQueueHandler(records))
    emit.setLevel(logging.INFO)
    emit.propagate = False
    listener.start()
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
    listener.stop()  # writes everything queued
    return [json.loads(line) for line in output.getvalue().splitlines()]


def test_a_line_logged_during_a_call_carries_its_request_id_and_traceback() -> None:
    lines = _through_the_queue(logging.getLogger("test.log_queue"))
    assert [line["message"] for line in lines] == ["listing 3 keys", "failed", "outside any call"]
    assert lines[0]["request_id"] == "req-42"
    assert lines[1]["request_id"] == "req-42"
    assert "ValueError: boom" in str(lines[1]["exception"])
    assert "request_id" not in lines[2]
