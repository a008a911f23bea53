"""The committed database of an older server (tests/fixtures/pre_keyed_audit, schema revision
0001, made before the keyed audit chain), ready to be upgraded: as that server left it on
SQLite, or its rows loaded into a PostgreSQL database at revision 0001."""

from __future__ import annotations

import shutil
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine, text

from server.db.migrate import alembic_config
from tests.conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "pre_keyed_audit"
LEGACY_EVENTS = 8  # the last one: the VerifyAuditLog that checked the old chain
# Parents before children, so foreign keys hold at every insert.
TABLES = ("server_meta", "keys", "key_versions", "backup_bindings", "audit_events")


def legacy_data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "kms"
    data_dir.mkdir(mode=0o700)
    shutil.copy(FIXTURE / "kms.sqlite3", data_dir / "kms.sqlite3")
    shutil.copy(FIXTURE / "root.key", data_dir / "root.key")
    (data_dir / "root.key").chmod(0o600)  # git keeps no mode bits but the executable one
    return data_dir


def load_into_postgres(sqlite_file: Path, postgres_url: str) -> None:
    """The old rows in a PostgreSQL database at revision 0001, as a replica set would have."""
    engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    source = create_engine(f"sqlite:///{sqlite_file}")
    with source.connect() as old, engine.begin() as new:
        new.execute(text("DELETE FROM audit_head"))
        for table in (*TABLES, "audit_head"):
            rows = [dict(row) for row in old.execute(text(f"SELECT * FROM {table}")).mappings()]
            if table == "keys":
                actives = {row["name"]: row["active_version"] for row in rows}
                rows = [{**row, "active_version": None} for row in rows]
            if table == "backup_bindings":
                rows = [{**row, "recovered": bool(row["recovered"])} for row in rows]
            if rows:
                columns = list(rows[0])
                new.execute(
                    text(
                        f"INSERT INTO {table} ({', '.join(columns)}) "
                        f"VALUES ({', '.join(':' + c for c in columns)})"
                    ),
                    rows,
                )
            if table == "key_versions":
                for name, active in actives.items():
                    new.execute(
                        text("UPDATE keys SET active_version = :a WHERE name = :n"),
                        {"a": active, "n": name},
                    )
    source.dispose()
    engine.dispose()
