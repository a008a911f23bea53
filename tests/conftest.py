"""Shared fixtures: a real kms-server on an ephemeral port, on SQLite and on PostgreSQL.

The PostgreSQL variant runs when KMS_TEST_DATABASE_URL names a server (for
example postgresql://postgres@127.0.0.1:5432/postgres); each test gets a
database of its own, created and dropped around it. Without the variable the
PostgreSQL variants are skipped, and pytest's summary says so.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from kms.v1 import kms_pb2_grpc
from server import config, devmode
from server.app import KmsServer, create_server

POSTGRES_URL_VARIABLE = "KMS_TEST_DATABASE_URL"
REPO = Path(__file__).resolve().parents[1]
ROLES = ("admin", "backup", "restore", "auditor")


def child_environment() -> dict[str, str]:
    """For server and client subprocesses: this environment minus KMS_* settings, with the
    repository importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@dataclass
class RunningKms:
    """A server started by a test, with one token per role."""

    address: str
    data_dir: Path
    database_url: str
    settings: config.ServerSettings
    tokens: dict[str, str]
    token_files: dict[str, Path]
    server: KmsServer
    _channels: list[grpc.Channel] = field(default_factory=list)

    def stub(self, role: str | None = None) -> KmsStub:
        """A stub whose every call carries the role's token (none when role is None)."""
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        metadata = (("authorization", f"Bearer {self.tokens[role]}"),) if role else ()
        return KmsStub(kms_pb2_grpc.KeyManagementServiceStub(channel), metadata)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self.server.stop(grace_seconds=1)


class KmsStub:
    """Forwards to the generated stub, adding the credentials metadata to every call."""

    def __init__(
        self, stub: kms_pb2_grpc.KeyManagementServiceStub, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, method: str):  # type: ignore[no-untyped-def]
        call = getattr(self._stub, method)

        def invoke(request, **kwargs):  # type: ignore[no-untyped-def]
            kwargs.setdefault("metadata", self._metadata)
            kwargs.setdefault("timeout", 30)
            return call(request, **kwargs)

        return invoke


def start_kms(data_dir: Path, database_url: str = "", **overrides: str) -> RunningKms:
    args = ["--dev", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0"]
    # Most tests destroy at once (a zero delay, dev mode only); the lifecycle tests set one.
    overrides.setdefault("destroy_delay", "0s")
    if database_url:
        args += ["--database-url", database_url]
    for flag, value in overrides.items():
        args += [f"--{flag.replace('_', '-')}", value]
    settings = config.parse(args, environ={})
    devmode.bootstrap(settings)
    running = create_server(settings, upgrade_schema=True)
    token_files = {role: data_dir / "tokens" / role for role in ROLES}
    return RunningKms(
        address=f"127.0.0.1:{running.port}",
        data_dir=data_dir,
        database_url=settings.database_url,
        settings=settings,
        tokens={role: path.read_text().strip() for role, path in token_files.items()},
        token_files=token_files,
        server=running,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield ""
        return
    yield from fresh_postgres_database()


def fresh_postgres_database() -> Iterator[str]:
    base = os.environ.get(POSTGRES_URL_VARIABLE)
    if not base:
        pytest.skip(f"PostgreSQL tests need {POSTGRES_URL_VARIABLE} (not set)")
    admin_url = make_url(base).set(drivername="postgresql+psycopg")
    name = f"kms_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def kms(tmp_path: Path, database_url: str) -> Iterator[RunningKms]:
    running = start_kms(tmp_path / "kms", database_url)
    try:
        yield running
    finally:
        running.close()
