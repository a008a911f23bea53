"""Group commit: concurrent GetActiveKey / ResolveKeyForBackup calls share one transaction.

Batches form by themselves under load; these tests also hand the service a
batch directly, to pin down what happens inside one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
from sqlalchemy import text

from server.domain.errors import NotFound
from server.domain.model import Action, DataKey
from server.usecases.data_keys import _DataKeyRequest
from tests.conftest import RunningKms
from tests.integration.kms_helpers import (
    KEY,
    all_audit_events,
    database,
    expect_error,
    issue,
    register,
    resolve,
    rotate,
    verify,
)


def _run_batch(kms: RunningKms, requests: list[_DataKeyRequest]) -> None:
    assert kms.server.service is not None
    kms.server.service.data_keys._run_batch(requests)


def test_one_backup_id_twice_in_one_batch_gets_one_binding_and_the_same_key(
    kms: RunningKms,
) -> None:
    register(kms.stub("admin"), activate=True)
    first = _DataKeyRequest("dev-backup", Action.ISSUE_DATA_KEY, "twice", KEY)
    second = _DataKeyRequest("dev-backup", Action.ISSUE_DATA_KEY, "twice", KEY)
    _run_batch(kms, [first, second])

    assert isinstance(first.outcome, DataKey) and isinstance(second.outcome, DataKey)
    assert first.outcome.plaintext == second.outcome.plaintext
    with database(kms) as connection:
        count = connection.execute(
            text("SELECT count(*) FROM backup_bindings WHERE backup_id = 'twice'")
        ).scalar_one()
    assert count == 1
    issued = [e for e in all_audit_events(kms.stub("auditor")) if e.backup_id == "twice"]
    assert [e.detail for e in issued] == [
        "data_keys_wrapped=1",
        "repeated request: returned the existing binding",
    ]
    assert resolve(kms.stub("restore"), "twice").data_key == first.outcome.plaintext


def test_a_denied_call_in_a_batch_is_audited_and_does_not_stop_the_others(
    kms: RunningKms,
) -> None:
    register(kms.stub("admin"), activate=True)
    good = _DataKeyRequest("dev-backup", Action.ISSUE_DATA_KEY, "good", KEY)
    unknown_key = _DataKeyRequest("dev-backup", Action.ISSUE_DATA_KEY, "bad", "no-such-key")
    unknown_backup = _DataKeyRequest("dev-restore", Action.RESOLVE_DATA_KEY, "missing", "")
    _run_batch(kms, [good, unknown_key, unknown_backup])

    assert isinstance(good.outcome, DataKey)
    assert isinstance(unknown_key.outcome, NotFound)
    assert unknown_key.outcome.reason == "KEY_NOT_FOUND"
    assert isinstance(unknown_backup.outcome, NotFound)
    events = {e.backup_id: e for e in all_audit_events(kms.stub("auditor")) if e.backup_id}
    assert events["good"].status_code == "OK"
    assert events["bad"].status_code == "NOT_FOUND"
    assert events["missing"].status_code == "NOT_FOUND"
    assert verify(kms).intact


def test_concurrent_calls_across_a_rotation_each_resolve_to_their_own_version(
    kms: RunningKms,
) -> None:
    admin = kms.stub("admin")
    register(admin, activate=True)
    register(admin)
    backup, restore = kms.stub("backup"), kms.stub("restore")

    def issue_one(index: int) -> tuple[str, int, bytes]:
        response = issue(backup, f"concurrent-{index}")
        return response.backup_id, response.version, response.data_key

    with ThreadPoolExecutor(max_workers=32) as pool:
        before = list(pool.map(issue_one, range(150)))
        rotate(admin, 2)
        after = list(pool.map(issue_one, range(150, 300)))
        resolved = list(pool.map(lambda b: resolve(restore, b[0]), before + after))

    assert {version for _, version, _ in before} == {1}
    assert {version for _, version, _ in after} == {2}
    for (backup_id, version, data_key), answer in zip(before + after, resolved, strict=True):
        assert (answer.backup_id, answer.version, answer.data_key) == (
            backup_id,
            version,
            data_key,
        )
    issued = [e for e in all_audit_events(kms.stub("auditor")) if e.action == "data_key.issue"]
    assert len(issued) == 300
    assert verify(kms).intact


def test_calls_still_succeed_one_by_one_when_there_is_nothing_to_batch_with(
    kms: RunningKms,
) -> None:
    register(kms.stub("admin"), activate=True)
    answer = issue(kms.stub("backup"), "alone")
    assert answer.version == 1
    expect_error(
        lambda: issue(kms.stub("backup"), "alone", key="other-key"),
        grpc.StatusCode.ALREADY_EXISTS,
        "BACKUP_ID_IN_USE",
    )
