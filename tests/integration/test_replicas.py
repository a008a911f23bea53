"""Two real `kms-server` processes on one PostgreSQL database, as replicas behind a balancer.

Nothing is cached in a process: every call reads the database, so a rotation
through one replica is what the next call through the other one sees, and
concurrent writers through both keep one active version and one audit chain.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from kms.v1 import kms_pb2
from tests.integration.cluster import (
    Replica,
    Secrets,
    attempt,
    audit_events,
    code_of,
    postgres_database,
    register,
    replicas,
    verify_chain,
)

pytestmark = pytest.mark.postgres

ALLOWED = kms_pb2.AUDIT_OUTCOME_ALLOWED
DENIED = kms_pb2.AUDIT_OUTCOME_DENIED


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Replica]]:
    for url in postgres_database():
        with replicas(url, Secrets.create(tmp_path / "secrets"), tmp_path) as started:
            yield started


def test_a_rotation_through_one_replica_is_seen_by_the_next_call_through_the_other(
    cluster: list[Replica],
) -> None:
    one, two = cluster
    register(one.stub("admin"), "tenant", 2)
    backup_two = two.stub("backup")
    # Replica 2 has served this key already: a cache would now be stale.
    assert backup_two.GetActiveKey(_issue("tenant", "before")).version == 1

    one.stub("admin").RotateActive(
        kms_pb2.RotateActiveRequest(key_name="tenant", to_version=2, expected_active_version=1)
    )

    assert backup_two.GetActiveKey(_issue("tenant", "after")).version == 2
    keys = two.stub("admin").ListKeys(kms_pb2.ListKeysRequest()).keys
    assert [(key.name, key.active_version) for key in keys] == [("tenant", 2)]
    # The backup made before the rotation stays bound to its own version, through either replica.
    for replica in cluster:
        resolved = replica.stub("restore").ResolveKeyForBackup(
            kms_pb2.ResolveKeyForBackupRequest(backup_id="before")
        )
        assert resolved.version == 1


def test_fifty_concurrent_guarded_rotations_over_both_replicas_serialize(
    cluster: list[Replica],
) -> None:
    key, versions = "contended", 7
    register(cluster[0].stub("admin"), key, versions)
    # A disabled version: rotations to it are refused with FAILED_PRECONDITION.
    cluster[0].stub("admin").DisableKeyVersion(
        kms_pb2.DisableKeyVersionRequest(key_name=key, version=versions)
    )
    admins = [replica.stub("admin") for replica in cluster]
    # Call i expects version e and moves to e+1 (a cycle 1 -> 2 -> ... -> 7 -> 1): which
    # ones win depends on the interleaving, and every loser must be refused cleanly.
    requests = [
        kms_pb2.RotateActiveRequest(
            key_name=key,
            expected_active_version=i % versions + 1,
            to_version=(i + 1) % versions + 1,
            reason=f"call {i}",
        )
        for i in range(50)
    ]
    with ThreadPoolExecutor(max_workers=25) as pool:
        outcomes = list(
            pool.map(lambda i: attempt(lambda: admins[i % 2].RotateActive(requests[i])), range(50))
        )

    wins = [outcome for outcome in outcomes if not isinstance(outcome, grpc.RpcError)]
    losses = [outcome for outcome in outcomes if isinstance(outcome, grpc.RpcError)]
    assert wins, "at least the call expecting version 1 can win"
    codes = Counter(code_of(error) for error in losses)
    assert set(codes) <= {grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION}, codes

    listed = cluster[1].stub("admin").ListKeyVersions(kms_pb2.ListKeyVersionsRequest(key_name=key))
    active = [version.version for version in listed.key_versions if version.active]
    assert len(active) == 1

    auditor = cluster[1].stub("auditor")
    rotations = [event for event in audit_events(auditor) if event.action == "key.rotate"]
    allowed = [event for event in rotations if event.outcome == ALLOWED]
    denied = [event for event in rotations if event.outcome == DENIED]
    # Exactly one audit event per successful rotation, and one denial per refused call.
    assert len(allowed) == len(wins)
    assert len(denied) == len(losses)
    assert sorted(event.sequence for event in allowed) == sorted(w.audit_sequence for w in wins)
    # The winners form one line: each starts where the one before it ended.
    line = sorted(wins, key=lambda win: win.audit_sequence)
    assert line[0].from_version == 1
    for before, after in itertools.pairwise(line):
        assert after.from_version == before.to_version
    assert line[-1].to_version == active[0]
    verify_chain(auditor)


def test_a_thousand_concurrent_get_active_key_calls_over_both_replicas(
    cluster: list[Replica],
) -> None:
    key, total = "busy", 1000
    register(cluster[0].stub("admin"), key, 2)
    backups = [replica.stub("backup") for replica in cluster]
    ids = [f"b-{uuid.uuid4()}" for _ in range(total)]

    def issue(i: int) -> Any:
        if i == total // 2:
            # A rotation in the middle of the load: backups after it may get version 2.
            cluster[i % 2].stub("admin").RotateActive(
                kms_pb2.RotateActiveRequest(key_name=key, to_version=2)
            )
        return backups[i % 2].GetActiveKey(_issue(key, ids[i]))

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        issued = list(pool.map(issue, range(total)))
    elapsed = time.monotonic() - start
    print(f"\n{total} GetActiveKey over 2 replicas: {elapsed:.2f}s, {total / elapsed:.0f} calls/s")

    assert {reply.version for reply in issued} <= {1, 2}
    restores = [replica.stub("restore") for replica in cluster]

    def resolve(i: int) -> Any:
        # Through the replica that did not issue it.
        return restores[(i + 1) % 2].ResolveKeyForBackup(
            kms_pb2.ResolveKeyForBackupRequest(backup_id=ids[i])
        )

    with ThreadPoolExecutor(max_workers=32) as pool:
        resolved = list(pool.map(resolve, range(total)))
    for got, made in zip(resolved, issued, strict=True):
        assert (got.backup_id, got.version, got.data_key) == (
            made.backup_id,
            made.version,
            made.data_key,
        )
        assert not got.recovered
    # A retried GetActiveKey through the other replica returns the same binding.
    for i in range(0, total, 50):
        again = backups[(i + 1) % 2].GetActiveKey(_issue(key, ids[i]))
        assert (again.version, again.data_key) == (issued[i].version, issued[i].data_key)

    auditor = cluster[0].stub("auditor")
    issues = [event for event in audit_events(auditor) if event.action == "data_key.issue"]
    assert len({event.backup_id for event in issues}) == total
    result = verify_chain(auditor)
    assert result.events_checked >= 2 * total


def _issue(key: str, backup_id: str) -> kms_pb2.GetActiveKeyRequest:
    return kms_pb2.GetActiveKeyRequest(key_name=key, backup_id=backup_id)
