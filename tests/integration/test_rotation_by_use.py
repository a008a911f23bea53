"""Rotation by use: each version counts the data keys it wraps, and the key is rotated before
its active version passes --max-data-keys-per-version, with no GetActiveKey failing for it.
On one server (SQLite and PostgreSQL), on two replicas sharing PostgreSQL, through retirement,
and against someone who rewrites the count in the database."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from kms.v1 import kms_pb2
from server.domain.model import SCHEDULER
from tests.conftest import RunningKms, start_kms
from tests.integration.cluster import Replica, Secrets, audit_events, postgres_database
from tests.integration.cluster import register as register_versions
from tests.integration.kms_helpers import (
    KEY,
    all_audit_events,
    code_of,
    database,
    issue,
    reason_of,
    register,
    resolve,
    rotate,
    verify,
    versions,
)

BOUND = 1000  # the smallest --max-data-keys-per-version
USE_ROTATION = re.compile(
    r"automatic rotation by use: version (\d+) has wrapped (\d+) data keys, and the bound is "
    + str(BOUND)
)


@pytest.fixture
def kms(tmp_path: Path, database_url: str) -> Any:
    running = start_kms(tmp_path / "kms", database_url, max_data_keys_per_version=str(BOUND))
    yield running
    running.close()


def _issue_all(issue_one: Callable[[str], Any], backup_ids: Sequence[str]) -> list[Any]:
    """GetActiveKey for every backup id, 32 at a time (so batches share transactions)."""
    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(issue_one, backup_ids))


def _use_rotations(events: Sequence[Any]) -> list[tuple[int, int]]:
    """(from version, its count) of every rotation by use in the log."""
    found = []
    for event in events:
        match = USE_ROTATION.search(event.detail)
        if match and event.action == "key_version.register":
            assert event.actor == SCHEDULER and event.to_version == event.version
            found.append((int(match.group(1)), int(match.group(2))))
    return found


def test_the_key_is_rotated_before_the_bound_and_no_call_fails(kms: RunningKms) -> None:
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    total = 2 * BOUND + 500
    issued = _issue_all(lambda b: issue(backup, b), [f"b-{n}" for n in range(total)])

    by_version = Counter(key.version for key in issued)
    listed = {v.version: v for v in versions(admin)}
    # Every version stayed within the bound, and the counts add up to the calls.
    assert all(v.data_keys_wrapped <= BOUND for v in listed.values())
    assert sum(v.data_keys_wrapped for v in listed.values()) == total
    assert {n: v.data_keys_wrapped for n, v in listed.items() if v.data_keys_wrapped} == dict(
        by_version
    )
    assert len(listed) >= 3 and listed[max(listed)].active
    # One rotation per version that filled up, each recorded as the scheduler's.
    rotations = _use_rotations(all_audit_events(kms.stub("auditor"), KEY))
    assert [version for version, _ in rotations] == list(range(1, max(listed)))
    assert all(count == listed[version].data_keys_wrapped for version, count in rotations)
    # Old backups resolve through their own version; the log replays to the same counts.
    for key in issued[:: total // 10]:
        resolved = resolve(restore, key.backup_id)
        assert (resolved.version, resolved.data_key) == (key.version, key.data_key)
    result = verify(kms)
    assert result.intact, result.problem


def test_each_wrapped_data_key_states_the_count_after_it(kms: RunningKms) -> None:
    backup = kms.stub("backup")
    register(kms.stub("admin"), activate=True)
    for n in range(3):
        issue(backup, f"b-{n}")
    issue(backup, "b-0")  # a retry: the existing key, nothing new wrapped
    events = [e for e in all_audit_events(kms.stub("auditor"), KEY) if e.action == "data_key.issue"]
    assert [e.detail for e in events] == [
        "data_keys_wrapped=1",
        "data_keys_wrapped=2",
        "data_keys_wrapped=3",
        "repeated request: returned the existing binding",
    ]
    assert versions(kms.stub("admin"))[0].data_keys_wrapped == 3


def test_a_retirement_onto_a_full_version_rotates_first(kms: RunningKms) -> None:
    admin, backup, restore = kms.stub("admin"), kms.stub("backup"), kms.stub("restore")
    register(admin, activate=True)
    old = {key.backup_id: key for key in _issue_all(lambda b: issue(backup, b), ["o-1", "o-2"])}
    register(admin)
    rotate(admin, 2)
    # Version 2 fills up to two keys below the bound: the two backups of version 1 do not fit.
    _issue_all(lambda b: issue(backup, b), [f"n-{n}" for n in range(BOUND - 1)])
    assert {v.version: v.data_keys_wrapped for v in versions(admin)}[2] >= BOUND - 1
    progress = admin.RewrapBackups(kms_pb2.RewrapBackupsRequest(key_name=KEY, from_version=1))
    listed = {v.version: v for v in versions(admin)}
    assert progress.to_version == max(listed) and listed[progress.to_version].active
    assert listed[progress.to_version].data_keys_wrapped == 2
    assert all(v.data_keys_wrapped <= BOUND for v in listed.values())
    for backup_id, key in old.items():
        resolved = resolve(restore, backup_id)
        assert (resolved.version, resolved.data_key) == (progress.to_version, key.data_key)
    assert verify(kms).intact


def test_a_count_reset_in_the_database_is_refused_and_reported(kms: RunningKms) -> None:
    admin, backup = kms.stub("admin"), kms.stub("backup")
    register(admin, activate=True)
    for n in range(5):
        issue(backup, f"b-{n}")
    with database(kms) as connection:
        connection.execute(text("UPDATE key_versions SET data_keys_wrapped = 0"))
    with pytest.raises(grpc.RpcError) as refused:
        issue(backup, "after-reset")
    assert code_of(refused.value) == grpc.StatusCode.DATA_LOSS
    assert reason_of(refused.value) == "STATE_INTEGRITY"
    result = verify(kms)
    assert not result.intact and "fails its MAC" in result.problem


def test_an_older_count_put_back_with_its_mac_is_caught_by_the_replay(kms: RunningKms) -> None:
    admin, backup = kms.stub("admin"), kms.stub("backup")
    register(admin, activate=True)
    issue(backup, "b-1")
    columns = "data_keys_wrapped, state_sequence, mac"
    with database(kms) as connection:
        saved = connection.execute(text(f"SELECT {columns} FROM key_versions")).one()
    for n in range(2, 6):
        issue(backup, f"b-{n}")
    with database(kms) as connection:  # the whole older row, MAC and all
        connection.execute(
            text("UPDATE key_versions SET data_keys_wrapped = :c, state_sequence = :s, mac = :m"),
            {"c": saved[0], "s": saved[1], "m": saved[2]},
        )
    result = verify(kms)
    assert not result.intact
    assert "1 data keys wrapped" in result.problem and "5 data keys wrapped" in result.problem


@pytest.mark.postgres
def test_two_replicas_add_up_exactly_and_rotate_once_per_full_version(tmp_path: Path) -> None:
    for url in postgres_database():
        secrets = Secrets.create(tmp_path / "secrets")
        started = [
            Replica(
                f"replica-{n}",
                url,
                secrets,
                tmp_path / f"r{n}",
                extra_args=["--dev", "--max-data-keys-per-version", str(BOUND)],
            )
            for n in (1, 2)
        ]
        try:
            for replica in started:
                replica.start()
            register_versions(started[0].stub("admin"), KEY, 1)
            stubs = [replica.stub("backup") for replica in started]
            total = 3 * BOUND

            def issue_on_either(backup_id: str, stubs: list[Any] = stubs) -> Any:
                stub = stubs[int(backup_id.rsplit("-", 1)[1]) % 2]
                return stub.GetActiveKey(
                    kms_pb2.GetActiveKeyRequest(key_name=KEY, backup_id=backup_id)
                )

            issued = _issue_all(issue_on_either, [f"b-{n}" for n in range(total)])
            admin = started[1].stub("admin")
            listed = admin.ListKeyVersions(kms_pb2.ListKeyVersionsRequest(key_name=KEY))
            counts = {v.version: v.data_keys_wrapped for v in listed.key_versions}
            assert sum(counts.values()) == total
            assert all(count <= BOUND for count in counts.values())
            assert Counter(key.version for key in issued) == Counter(
                {version: count for version, count in counts.items() if count}
            )
            rotations = _use_rotations(audit_events(started[0].stub("auditor")))
            # Exactly one rotation from each version that filled up, whichever replica saw it.
            assert sorted(version for version, _ in rotations) == list(range(1, max(counts)))
            verified = started[0].stub("auditor").VerifyAuditLog(kms_pb2.VerifyAuditLogRequest())
            assert verified.intact, verified.problem
        finally:
            for replica in started:
                replica.kill()
                replica.close_channels()
