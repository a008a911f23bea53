"""The benchmark reads kms-server's own time per call from its call lines: it must read
exactly what the server writes (JsonCallLog), and only the method and lines it asks for."""

from __future__ import annotations

import io
import logging
import subprocess
from pathlib import Path
from typing import cast

from benchmarks.servers import KmsProcess
from server.api.observability import CallInfo, JsonCallLog, JsonFormatter, LogWriter

SERVICE = "/kms.v1.KeyManagementService"


def _call_lines(*calls: tuple[str, float]) -> str:
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(JsonFormatter())
    writer = LogWriter(handler)
    writer.start()
    call_log = JsonCallLog(writer)
    for method, seconds in calls:
        call_log.write(CallInfo(f"{SERVICE}/{method}", "req"), "OK", "", seconds, "ipv4:x")
    writer.stop()
    return output.getvalue()


def _server_logging_to(log_path: Path) -> KmsProcess:
    # Only the log is read: no process is started.
    return KmsProcess("127.0.0.1:0", cast(subprocess.Popen[bytes], None), log_path, log_path)


def test_handler_seconds_are_the_call_lines_of_that_method_after_the_offset(
    tmp_path: Path,
) -> None:
    log_path = tmp_path / "kms.log"
    log_path.write_text(_call_lines(("GetActiveKey", 0.5)))  # before the phase
    server = _server_logging_to(log_path)
    since = server.log_offset()
    lines = _call_lines(("GetActiveKey", 0.0012), ("ResolveKeyForBackup", 0.004))
    with open(log_path, "a") as log:
        log.write("a line that is not JSON\n")
        log.write('{"message": "a JSON line without a duration"}\n')
        log.write(lines)
        log.write(_call_lines(("GetActiveKey", 0.0034)))

    assert server.handler_seconds(since, "GetActiveKey") == [0.0012, 0.0034]
    assert server.handler_seconds(since, "ResolveKeyForBackup") == [0.004]
    assert server.handler_seconds(server.log_offset(), "GetActiveKey") == []
