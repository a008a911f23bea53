"""The command blocks of README.md and docs/cli.md marked runnable, run as written.

A block is marked by an HTML comment on the line before its fence:

    <!-- runnable -->            run in a fresh directory with the programs on PATH
    <!-- runnable: postgres -->  the same, when KMS_TEST_DATABASE_URL names a PostgreSQL

A document's blocks with the same mark run in order as one bash script (`set -euo pipefail`),
so a later block can use what an earlier one started. Two things are changed, so the
commands can run beside other tests: the port 50051 becomes a free one (KMS_LISTEN and
KMS_ADDR name it too), and the PostgreSQL URL of the documents becomes a database of the test's
own. Nothing else.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL_VARIABLE, REPO, child_environment

DOCUMENTS = ("README.md", "docs/cli.md")
DOCUMENTED_PORT = "50051"
DOCUMENTED_DATABASE_URL = "postgresql://kms@127.0.0.1:5432/kms"
MARK = re.compile(
    r"^<!-- runnable(?::\s*(?P<tag>[a-z]+))? -->\n```(?:sh|bash)\n(?P<body>.*?)^```", re.M | re.S
)


def runnable_blocks(document: str) -> dict[str, list[str]]:
    """The document's marked blocks by tag ("" for plain `runnable`), in order."""
    blocks: dict[str, list[str]] = {}
    for match in MARK.finditer((REPO / document).read_text()):
        blocks.setdefault(match["tag"] or "", []).append(match["body"])
    return blocks


CASES = [
    pytest.param(
        document,
        tag,
        id=f"{document}-{tag or 'plain'}",
        marks=[pytest.mark.postgres] if tag == "postgres" else [],
    )
    for document in DOCUMENTS
    for tag in runnable_blocks(document)
]


def test_each_document_has_runnable_blocks() -> None:
    assert "" in runnable_blocks("README.md") and "postgres" in runnable_blocks("README.md")
    assert "" in runnable_blocks("docs/cli.md")


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.fixture
def database_url() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    admin_url = os.environ.get(POSTGRES_URL_VARIABLE)
    if not admin_url:
        pytest.skip(f"{POSTGRES_URL_VARIABLE} is not set")
    name = f"kms_docs_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        make_url(admin_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.parametrize(("document", "tag"), CASES)
def test_runnable_commands_work_as_written(
    document: str, tag: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    port = _free_port()
    script = "\n".join(runnable_blocks(document)[tag]).replace(DOCUMENTED_PORT, port)
    if tag == "postgres":
        url = request.getfixturevalue("database_url")
        assert DOCUMENTED_DATABASE_URL in script
        script = script.replace(DOCUMENTED_DATABASE_URL, url)
    env = child_environment()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["KMS_LISTEN"] = env["KMS_ADDR"] = f"127.0.0.1:{port}"
    # Whatever a block leaves running in the background is stopped at the end.
    prologue = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    done = subprocess.run(
        ["bash", "-c", prologue + script],
        capture_output=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    logs = "".join(
        f"\n--- {log}\n{log.read_text(errors='replace')[-3000:]}"
        for log in tmp_path.rglob("server.log")
    )
    assert done.returncode == 0, (
        f"{document} ({tag or 'runnable'}) failed with {done.returncode}\n"
        f"--- stdout\n{done.stdout.decode(errors='replace')}\n"
        f"--- stderr\n{done.stderr.decode(errors='replace')}{logs}"
    )
    assert b"Traceback" not in done.stdout + done.stderr
