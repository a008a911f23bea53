"""Alembic migrations and models agree; a server never runs on a schema that is behind."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from server import config
from server.app import StartupError, create_server
from server.db import migrate
from server.db.engine import make_engine, sqlite_url
from server.db.models import Base
from tests.conftest import REPO, child_environment, fresh_postgres_database
from tests.integration.cluster import Secrets


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database on each backend."""
    if request.param == "sqlite":
        yield sqlite_url(str(tmp_path / "empty.sqlite3"))
    else:
        yield from fresh_postgres_database()


def test_upgrading_an_empty_database_gives_exactly_the_models(empty_database: str) -> None:
    engine = make_engine(empty_database)
    try:
        migrate.upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            tables = set(inspect(connection).get_table_names())
        assert set(Base.metadata.tables) | {"alembic_version"} == tables
        current, head = migrate.pending(engine)
        assert current == head
        # Upgrading again is a no-op.
        migrate.upgrade(engine)
        assert migrate.pending(engine) == (head, head)
    finally:
        engine.dispose()


def test_the_server_refuses_a_schema_that_is_behind_until_it_is_migrated(
    empty_database: str, tmp_path: Path
) -> None:
    secrets = Secrets.create(tmp_path / "secrets")
    settings = config.parse(
        [
            "--database-url",
            empty_database,
            "--root-key-file",
            str(secrets.root_key_file),
            "--policy-file",
            str(secrets.policy_file),
            "--insecure",
            "--listen",
            "127.0.0.1:0",
        ],
        environ={},
    )
    with pytest.raises(StartupError, match="kms-server migrate"):
        create_server(settings, upgrade_schema=False)

    migrated = subprocess.run(
        [sys.executable, "-m", "server.main", "migrate", "--database-url", empty_database],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_environment(),
        timeout=60,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert "up to date" in migrated.stdout

    running = create_server(settings, upgrade_schema=False)
    running.stop(grace_seconds=0)


@pytest.mark.postgres
def test_a_replica_started_on_an_unmigrated_postgresql_names_the_command(tmp_path: Path) -> None:
    """The embedded SQLite upgrades itself; a shared PostgreSQL is migrated deliberately."""
    secrets = Secrets.create(tmp_path / "secrets")
    for url in fresh_postgres_database():
        served = subprocess.run(
            [
                sys.executable,
                "-m",
                "server.main",
                "--database-url",
                url,
                "--root-key-file",
                str(secrets.root_key_file),
                "--policy-file",
                str(secrets.policy_file),
                "--insecure",
                "--listen",
                "127.0.0.1:0",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=child_environment(),
            timeout=60,
        )
        assert served.returncode == 2
        assert "kms-server migrate" in served.stderr
        assert "revision none" in served.stderr
