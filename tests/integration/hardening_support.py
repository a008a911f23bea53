"""Helpers for the hardening tests: database snapshots, a failing audit table, metric scrapes."""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from tests.conftest import RunningKms
from tests.integration.kms_helpers import database, is_postgres

STATE_TABLES = ("keys", "key_versions", "backup_bindings")


def snapshot(
    kms: RunningKms, tables: tuple[str, ...] = STATE_TABLES
) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the state tables, in a stable order."""
    with database(kms) as connection:
        return {
            table: sorted(
                (tuple(row) for row in connection.execute(text(f"SELECT * FROM {table}"))), key=repr
            )
            for table in tables
        }


def audit_count(kms: RunningKms) -> int:
    with database(kms) as connection:
        return int(connection.execute(text("SELECT count(*) FROM audit_events")).scalar_one())


@contextlib.contextmanager
def audit_inserts_fail(kms: RunningKms) -> Iterator[None]:
    """A trigger makes every INSERT into audit_events fail, as a full disk or a bad grant would."""
    with database(kms) as connection:
        if is_postgres(connection):
            connection.execute(
                text(
                    "CREATE FUNCTION test_audit_fail() RETURNS trigger AS $$ "
                    "BEGIN RAISE EXCEPTION 'test: audit writes are failing'; END $$ "
                    "LANGUAGE plpgsql"
                )
            )
            connection.execute(
                text(
                    "CREATE TRIGGER test_audit_fail BEFORE INSERT ON audit_events "
                    "FOR EACH ROW EXECUTE FUNCTION test_audit_fail()"
                )
            )
        else:
            connection.execute(
                text(
                    "CREATE TRIGGER test_audit_fail BEFORE INSERT ON audit_events "
                    "BEGIN SELECT RAISE(ABORT, 'test: audit writes are failing'); END"
                )
            )
    try:
        yield
    finally:
        with database(kms) as connection:
            if is_postgres(connection):
                connection.execute(text("DROP TRIGGER test_audit_fail ON audit_events"))
                connection.execute(text("DROP FUNCTION test_audit_fail()"))
            else:
                connection.execute(text("DROP TRIGGER test_audit_fail"))


def scrape(kms: RunningKms) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's metrics endpoint as {(sample name, sorted labels): value}."""
    port = kms.server.metrics_port
    assert port is not None, "start the server with metrics_listen"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
