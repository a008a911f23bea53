"""Two tenants on one KMS: scoped grants, out of scope revealing nothing, backup never reading.

Driven with the command-line programs (kms-backup, kms-restore, kmsctl) and the raw stubs,
as tenant A's operators and as someone holding one of tenant A's tokens.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from client import backup, kmsctl, restore
from client.archive import read_header
from kms.v1 import kms_pb2, kms_pb2_grpc
from server.policy import hash_token
from tests.conftest import KmsStub, RunningKms, start_kms
from tests.integration.conftest import Outcome, run_program
from tests.integration.kms_helpers import (
    all_audit_events,
    code_of,
    expect_error,
    message_of,
    reason_of,
)

TENANT_A, TENANT_B = "tenant-a", "tenant-b"
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

# principal -> (role, keys)
TENANT_PRINCIPALS = {
    "admin-a": ("admin", ["tenant-a", "tenant-a-*"]),
    "backup-a": ("backup", ["tenant-a", "tenant-a-*"]),
    "backup-a2": ("backup", ["tenant-a"]),
    "restore-a": ("restore", ["tenant-a", "tenant-a-*"]),
    "auditor-a": ("auditor", ["tenant-a", "tenant-a-*"]),
    "admin-b": ("admin", ["tenant-b*"]),
    "backup-b": ("backup", ["tenant-b*"]),
    "restore-b": ("restore", ["tenant-b*"]),
    "auditor-b": ("auditor", ["tenant-b*"]),
}


class Tenants:
    """The server with the tenants' principals added to the dev-mode policy."""

    def __init__(self, kms: RunningKms, directory: Path) -> None:
        self.kms = kms
        self.tokens: dict[str, str] = {}
        self.token_files: dict[str, Path] = {}
        lines = [(kms.data_dir / "policy.toml").read_text()]
        for name, (role, keys) in TENANT_PRINCIPALS.items():
            token = secrets.token_urlsafe(32)
            self.tokens[name] = token
            self.token_files[name] = directory / f"{name}.token"
            self.token_files[name].write_text(token + "\n")
            lines.append(
                f'\n[principals.{name}]\nauth = ["token"]\ntoken_sha256 = ["{hash_token(token)}"]\n'
                f"[[principals.{name}.grants]]\nroles = [{json.dumps(role)}]\n"
                f"keys = {json.dumps(keys)}\n"
            )
        (kms.data_dir / "policy.toml").write_text("".join(lines))
        assert kms.server.reload()

    def stub(self, principal: str) -> KmsStub:
        channel = grpc.insecure_channel(self.kms.address)
        self.kms._channels.append(channel)
        metadata = (("authorization", f"Bearer {self.tokens[principal]}"),)
        return KmsStub(kms_pb2_grpc.KeyManagementServiceStub(channel), metadata)

    def cli(self, program: str, principal: str, *argv: str) -> Outcome:
        main = {"backup": backup.main, "restore": restore.main, "kmsctl": kmsctl.main}[program]
        connection = ["--addr", self.kms.address, "--token-file", str(self.token_files[principal])]
        if program == "backup":  # kms-backup create [options] SOURCE
            return run_program(main, [argv[0], *connection, *argv[1:]])
        return run_program(main, [*argv, *connection])


@pytest.fixture
def tenants(tmp_path: Path, database_url: str) -> Iterator[Tenants]:
    kms = start_kms(tmp_path / "kms", database_url, data_key_retry_window="2")
    try:
        yield Tenants(kms, tmp_path)
    finally:
        kms.close()


def _make_backup(tenants: Tenants, principal: str, key: str, tmp: Path, name: str) -> Path:
    source = tmp / f"{name}.txt"
    source.write_text(f"payroll of {name}\n")
    archive = tmp / f"{name}.kbk"
    made = tenants.cli("backup", principal, "create", "--key", key, str(source), "-o", str(archive))
    assert made.exit_code == 0, made.stderr
    return archive


def _setup_both_tenants(tenants: Tenants) -> None:
    for admin, key in (("admin-a", TENANT_A), ("admin-b", TENANT_B)):
        done = tenants.cli("kmsctl", admin, "register", key, "--activate")
        assert done.exit_code == 0, done.stderr


def test_tenant_a_can_do_nothing_with_tenant_b_and_learns_nothing(
    tenants: Tenants, tmp_path: Path
) -> None:
    _setup_both_tenants(tenants)
    archive_a = _make_backup(tenants, "backup-a", TENANT_A, tmp_path, "a")
    archive_b = _make_backup(tenants, "backup-b", TENANT_B, tmp_path, "b")

    # Each tenant restores its own backup with the CLI...
    restored = tmp_path / "restored-a.txt"
    done = tenants.cli("restore", "restore-a", str(archive_a), "-o", str(restored))
    assert done.exit_code == 0, done.stderr
    assert restored.read_text() == "payroll of a\n"
    # ...and tenant A's restore token fails on tenant B's exactly as on a backup never made.
    refused = tenants.cli("restore", "restore-a", str(archive_b), "-o", str(tmp_path / "x"))
    assert refused.exit_code != 0
    assert not (tmp_path / "x").exists()
    with archive_b.open("rb") as stream:
        header_b = read_header(stream).header
    with archive_a.open("rb") as stream:
        header_a = read_header(stream).header
    restore_a = tenants.stub("restore-a")
    out_of_scope = expect_error(
        lambda: restore_a.ResolveKeyForBackup(
            kms_pb2.ResolveKeyForBackupRequest(backup_id=header_b.backup_id)
        ),
        grpc.StatusCode.NOT_FOUND,
        "BACKUP_NOT_FOUND",
    )
    never_made = "ffffffff-0000-4000-8000-000000000000"
    unknown = expect_error(
        lambda: restore_a.ResolveKeyForBackup(
            kms_pb2.ResolveKeyForBackupRequest(backup_id=never_made)
        ),
        grpc.StatusCode.NOT_FOUND,
        "BACKUP_NOT_FOUND",
    )
    assert message_of(out_of_scope) == message_of(unknown).replace(never_made, header_b.backup_id)
    assert TENANT_B not in message_of(out_of_scope)
    # The archive header offered for recovery does not help either: same answer as a header
    # naming a key version that does not exist.
    recovery = kms_pb2.BackupKeyReference(
        key_name=TENANT_B, version=1, wrapped_data_key=header_b.wrapped_data_key
    )
    made_up = kms_pb2.BackupKeyReference(
        key_name=TENANT_A, version=99, wrapped_data_key=header_b.wrapped_data_key
    )
    with_header = expect_error(
        lambda: restore_a.ResolveKeyForBackup(
            kms_pb2.ResolveKeyForBackupRequest(backup_id=never_made, recovery=recovery)
        ),
        grpc.StatusCode.NOT_FOUND,
        "BACKUP_NOT_FOUND",
    )
    nonexistent = expect_error(
        lambda: restore_a.ResolveKeyForBackup(
            kms_pb2.ResolveKeyForBackupRequest(backup_id=never_made, recovery=made_up)
        ),
        grpc.StatusCode.NOT_FOUND,
        "BACKUP_NOT_FOUND",
    )
    assert message_of(with_header).replace(TENANT_B, "K").replace(" 1)", " N)") == (
        message_of(nonexistent).replace(TENANT_A, "K").replace(" 99)", " N)")
    )

    # A header offered with tenant B's bound backup id: answered as for an id never bound.
    for reference in (
        recovery,
        made_up,
        kms_pb2.BackupKeyReference(
            key_name=TENANT_A, version=1, wrapped_data_key=header_b.wrapped_data_key
        ),
    ):
        replies = []
        for backup_id in (header_b.backup_id, never_made):
            try:
                restore_a.ResolveKeyForBackup(
                    kms_pb2.ResolveKeyForBackupRequest(backup_id=backup_id, recovery=reference)
                )
            except grpc.RpcError as refusal:
                replies.append(
                    (
                        code_of(refusal),
                        reason_of(refusal),
                        message_of(refusal).replace(backup_id, "ID"),
                    )
                )
        assert len(replies) == 2 and replies[0] == replies[1], replies

    # Tenant A's backup token: tenant B's key and a key that does not exist look alike.
    backup_a = tenants.stub("backup-a")
    answers = []
    for key in (TENANT_B, "tenant-b-never-made", "other-tenant"):
        error = expect_error(
            functools.partial(
                backup_a.GetActiveKey,
                kms_pb2.GetActiveKeyRequest(key_name=key, backup_id=f"probe-{key}"),
            ),
            PERMISSION_DENIED,
            "KEY_NOT_IN_SCOPE",
        )
        answers.append(message_of(error).replace(key, "KEY"))
    assert len(set(answers)) == 1
    # Tenant B's backup id, reused with tenant A's own key: in use, nothing more said.
    reused = expect_error(
        lambda: backup_a.GetActiveKey(
            kms_pb2.GetActiveKeyRequest(key_name=TENANT_A, backup_id=header_b.backup_id)
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "BACKUP_ID_IN_USE",
    )
    assert TENANT_B not in message_of(reused)

    # Tenant A's admin: tenant B's key is out of scope for every call, existing or not.
    admin_a = tenants.stub("admin-a")
    calls: list[Callable[[str], Any]] = [
        lambda key: admin_a.ListKeyVersions(kms_pb2.ListKeyVersionsRequest(key_name=key)),
        lambda key: admin_a.GetKeyVersion(kms_pb2.GetKeyVersionRequest(key_name=key, version=1)),
        lambda key: admin_a.RegisterKeyVersion(kms_pb2.RegisterKeyVersionRequest(key_name=key)),
        lambda key: admin_a.RotateActive(kms_pb2.RotateActiveRequest(key_name=key, to_version=1)),
        lambda key: admin_a.DisableKeyVersion(
            kms_pb2.DisableKeyVersionRequest(key_name=key, version=1)
        ),
        lambda key: admin_a.EnableKeyVersion(
            kms_pb2.EnableKeyVersionRequest(key_name=key, version=1)
        ),
        lambda key: admin_a.DestroyKeyVersion(
            kms_pb2.DestroyKeyVersionRequest(key_name=key, version=1)
        ),
    ]
    for call in calls:
        for key in (TENANT_B, "tenant-b-never-made"):
            expect_error(functools.partial(call, key), PERMISSION_DENIED, "KEY_NOT_IN_SCOPE")
    listed = tenants.cli("kmsctl", "admin-a", "keys", "--json")
    assert listed.exit_code == 0, listed.stderr
    assert [k["name"] for k in json.loads(listed.stdout)] == [TENANT_A]
    # Nothing was registered for tenant B by tenant A's admin.
    all_keys = tenants.kms.stub("admin").ListKeys(kms_pb2.ListKeysRequest())
    assert [(k.name, k.version_count) for k in all_keys.keys] == [(TENANT_A, 1), (TENANT_B, 1)]

    # Tenant A's auditor sees events about tenant A's keys only, never events about no key.
    auditor_a = tenants.stub("auditor-a")
    seen = all_audit_events(auditor_a)
    assert seen and {e.key_name for e in seen} == {TENANT_A}
    everything = all_audit_events(tenants.kms.stub("auditor"))
    assert {e.sequence for e in everything if e.key_name == TENANT_A} == {e.sequence for e in seen}
    expect_error(
        lambda: auditor_a.ListAuditEvents(kms_pb2.ListAuditEventsRequest(key_name=TENANT_B)),
        PERMISSION_DENIED,
        "KEY_NOT_IN_SCOPE",
    )
    expect_error(
        lambda: auditor_a.VerifyAuditLog(kms_pb2.VerifyAuditLogRequest()),
        PERMISSION_DENIED,
        "SCOPE_TOO_NARROW",
    )
    # A checkpoint signs the chain hash, which covers every tenant's events.
    expect_error(
        lambda: auditor_a.GetAuditCheckpoint(kms_pb2.GetAuditCheckpointRequest()),
        PERMISSION_DENIED,
        "SCOPE_TOO_NARROW",
    )
    audited = tenants.cli("kmsctl", "auditor-a", "audit", "list", "--json")
    assert audited.exit_code == 0, audited.stderr
    assert TENANT_B not in audited.stdout

    # Every refusal is audited, with the real cause, for the auditor of every key.
    denials = [
        e
        for e in all_audit_events(tenants.kms.stub("auditor"))
        if e.outcome == kms_pb2.AUDIT_OUTCOME_DENIED
    ]
    hidden = [e for e in denials if e.actor == "restore-a" and e.backup_id == header_b.backup_id]
    assert hidden, "the out-of-scope resolve is audited"
    assert all(e.status_code == "PERMISSION_DENIED" for e in hidden)
    assert all(TENANT_B in e.detail and "outside" in e.detail for e in hidden)
    scoped = [e for e in denials if e.actor == "admin-a" and e.key_name == TENANT_B]
    assert len(scoped) == 7 and all(e.status_code == "PERMISSION_DENIED" for e in scoped)
    assert header_a.backup_id  # tenant A's own header stays usable to tenant A


def test_the_header_replay_attack_gets_no_data_key(tenants: Tenants, tmp_path: Path) -> None:
    """Read a backup id from an archive header, ask GetActiveKey for it with a backup token."""
    _setup_both_tenants(tenants)
    archive = _make_backup(tenants, "backup-a", TENANT_A, tmp_path, "weeks-old")
    with archive.open("rb") as stream:
        header = read_header(stream).header
    request = kms_pb2.GetActiveKeyRequest(key_name=header.key_name, backup_id=header.backup_id)
    issued_to_backup_a = []

    def attempt(principal: str) -> grpc.RpcError | None:
        try:
            response = tenants.stub(principal).GetActiveKey(request)
        except grpc.RpcError as error:
            return error
        issued_to_backup_a.append((principal, response.data_key))
        return None

    # Another backup principal of the same tenant, with the key in its scope.
    other = attempt("backup-a2")
    assert other is not None
    assert (code_of(other), reason_of(other)) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "BACKUP_ID_IN_USE",
    )
    assert header.key_name not in message_of(other).replace(header.backup_id, "")
    # The same principal, once the retry window (2 s here) has passed.
    time.sleep(2.2)
    late = attempt("backup-a")
    assert late is not None
    assert (code_of(late), reason_of(late)) == (grpc.StatusCode.ALREADY_EXISTS, "BACKUP_ID_IN_USE")
    assert issued_to_backup_a == [], "no data key went out"
    # The restore role still restores it: the separation holds both ways.
    restored = tmp_path / "restored.txt"
    done = tenants.cli("restore", "restore-a", str(archive), "-o", str(restored))
    assert done.exit_code == 0, done.stderr
    # The audit log says why each attempt was refused.
    events = [
        e
        for e in all_audit_events(tenants.kms.stub("auditor"))
        if e.backup_id == header.backup_id and e.action == "data_key.issue"
    ]
    causes = [
        (e.actor, e.status_code, e.detail)
        for e in events
        if e.outcome == kms_pb2.AUDIT_OUTCOME_DENIED
    ]
    assert [c[:2] for c in causes] == [
        ("backup-a2", "ALREADY_EXISTS"),
        ("backup-a", "ALREADY_EXISTS"),
    ]
    assert "bound for principal backup-a" in causes[0][2]
    assert "beyond the retry window" in causes[1][2]


def test_a_retry_by_the_same_principal_within_the_window_gets_the_same_key(
    tenants: Tenants,
) -> None:
    _setup_both_tenants(tenants)
    backup_a = tenants.stub("backup-a")
    request = kms_pb2.GetActiveKeyRequest(key_name=TENANT_A, backup_id="retried")
    first = backup_a.GetActiveKey(request)
    again = backup_a.GetActiveKey(request)
    assert again.data_key == first.data_key and again.version == first.version
    # The same id with another of the principal's keys is not a retry.
    register = tenants.stub("admin-a").RegisterKeyVersion
    register(kms_pb2.RegisterKeyVersionRequest(key_name="tenant-a-db", activate_first_version=True))
    expect_error(
        lambda: backup_a.GetActiveKey(
            kms_pb2.GetActiveKeyRequest(key_name="tenant-a-db", backup_id="retried")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "BACKUP_ID_IN_USE",
    )


def test_a_list_over_many_keys_out_of_scope_pages_through_to_the_keys_in_scope(
    tenants: Tenants,
) -> None:
    admin = tenants.kms.stub("admin")
    for index in range(30):
        admin.RegisterKeyVersion(kms_pb2.RegisterKeyVersionRequest(key_name=f"tenant-b-{index:02}"))
    for name in ("tenant-a", "tenant-a-x", "tenant-a-y"):
        admin.RegisterKeyVersion(kms_pb2.RegisterKeyVersionRequest(key_name=name))
    admin_a = tenants.stub("admin-a")
    names, token = [], ""
    while True:
        page = admin_a.ListKeys(kms_pb2.ListKeysRequest(page_size=2, page_token=token))
        assert len(page.keys) <= 2
        names += [k.name for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert names == ["tenant-a", "tenant-a-x", "tenant-a-y"]
