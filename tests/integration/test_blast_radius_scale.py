"""backup_count and ListBackups over the benchmark's quick scale of bindings: exact counts,
pages that add up, and the count answered from the (key_name, version) index."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from benchmarks import seed
from benchmarks.run import QUICK
from kms.v1 import kms_pb2
from tests.conftest import start_kms
from tests.integration.kms_helpers import database

KEYS = 4
VERSIONS = 8  # two per key


def test_counts_and_pages_at_the_benchmarks_scale(tmp_path: Path) -> None:
    data_dir = tmp_path / "kms"
    start_kms(data_dir).close()  # the schema and the server's keys
    bindings = QUICK.scale_bindings
    seeded = seed.seed(
        data_dir, "", keys=KEYS, versions=VERSIONS, bindings=bindings, audit_events=0
    )
    kms = start_kms(data_dir)
    try:
        admin = kms.stub("admin")
        per_version = bindings // VERSIONS
        total = 0
        for name in seeded.keys:
            listed = admin.ListKeyVersions(kms_pb2.ListKeyVersionsRequest(key_name=name))
            counts = [v.backup_count for v in listed.key_versions]
            assert counts == [per_version] * (VERSIONS // KEYS)
            total += sum(counts)
        assert total == bindings

        name = seeded.keys[0]
        seen, token = 0, ""
        while True:
            page = admin.ListBackups(
                kms_pb2.ListBackupsRequest(
                    key_name=name, version=1, page_size=1000, page_token=token
                )
            )
            seen += len(page.backups)
            token = page.next_page_token
            if not token:
                break
        assert seen == per_version

        with database(kms) as connection:
            plan = connection.execute(
                text(
                    "EXPLAIN QUERY PLAN SELECT count(*) FROM backup_bindings"
                    " WHERE key_name = :k AND version = 1"
                ),
                {"k": name},
            ).all()
        assert any("ix_backup_bindings_key_name_version" in str(row) for row in plan), plan
        assert not any("SCAN backup_bindings" in str(row) for row in plan), plan
    finally:
        kms.close()
