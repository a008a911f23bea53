"""Two replicas on one PostgreSQL database both look for due destructions: each is carried
out exactly once."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from kms.v1 import kms_pb2
from server.domain.model import SCHEDULER
from tests.integration.cluster import (
    Replica,
    Secrets,
    audit_events,
    postgres_database,
    register,
    verify_chain,
    wait_for,
)

pytestmark = pytest.mark.postgres

KEY = "lifecycle"
VERSIONS = 8


def test_two_replicas_carry_out_each_due_destruction_exactly_once(tmp_path: Path) -> None:
    for url in postgres_database():
        secrets = Secrets.create(tmp_path / "secrets")
        # Dev mode allows a short delay. The replica that scheduled a destruction sleeps
        # until it is due; the other finds it within 2 s, or at the due time it read before.
        started = [
            Replica(
                f"replica-{n}",
                url,
                secrets,
                tmp_path / f"r{n}",
                extra_args=["--dev", "--destroy-delay", "2s"],
            )
            for n in (1, 2)
        ]
        try:
            for replica in started:
                replica.start()
            one, two = started
            register(one.stub("admin"), KEY, VERSIONS)
            admins = [one.stub("admin"), two.stub("admin")]
            for version in range(2, VERSIONS + 1):
                admins[version % 2].DestroyKeyVersion(
                    kms_pb2.DestroyKeyVersionRequest(key_name=KEY, version=version)
                )

            def all_destroyed(two: Replica = two) -> bool:
                listed = two.stub("admin").ListKeyVersions(
                    kms_pb2.ListKeyVersionsRequest(key_name=KEY)
                )
                return all(
                    v.state == kms_pb2.KEY_VERSION_STATE_DESTROYED
                    for v in listed.key_versions
                    if v.version != 1
                )

            wait_for(all_destroyed, 30, "the due destructions")
            auditor = one.stub("auditor")
            carried_out = [
                e
                for e in audit_events(auditor)
                if e.action == "key_version.destroy" and e.outcome == kms_pb2.AUDIT_OUTCOME_ALLOWED
            ]
            assert sorted(e.version for e in carried_out) == list(range(2, VERSIONS + 1))
            assert {e.actor for e in carried_out} == {SCHEDULER}
            denied = [e for e in audit_events(auditor) if e.actor == SCHEDULER and e.outcome != 1]
            assert denied == []
            verify_chain(auditor)
        finally:
            for replica in started:
                replica.kill()
                replica.close_channels()


def test_two_replicas_rotate_a_key_once_per_period(tmp_path: Path) -> None:
    period = 2
    for url in postgres_database():
        secrets = Secrets.create(tmp_path / "secrets")
        started = [
            Replica(f"replica-{n}", url, secrets, tmp_path / f"r{n}", extra_args=["--dev"])
            for n in (1, 2)
        ]
        try:
            for replica in started:
                replica.start()
            one, two = started
            register(one.stub("admin"), KEY, 1)
            one.stub("admin").UpdateKey(
                kms_pb2.UpdateKeyRequest(key_name=KEY, rotation_period_seconds=period)
            )
            start = time.monotonic()
            time.sleep(3 * period + 0.5)
            two.stub("admin").UpdateKey(kms_pb2.UpdateKeyRequest(key_name=KEY))
            elapsed = time.monotonic() - start
            rotations = [
                e
                for e in audit_events(one.stub("auditor"))
                if e.action == "key_version.register" and e.actor == SCHEDULER
            ]
            # One per period, never two at once: the versions follow one another, and the
            # gaps between them are a period, give or take the schedulers' polling.
            assert 2 <= len(rotations) <= int(elapsed // period)
            assert [e.version for e in rotations] == list(range(2, 2 + len(rotations)))
            gaps = [(b.time.ToMicroseconds() - a.time.ToMicroseconds()) / 1e6
                    for a, b in itertools.pairwise(rotations)]  # fmt: skip
            assert all(gap >= period - 0.05 for gap in gaps), gaps
            verify_chain(one.stub("auditor"))
        finally:
            for replica in started:
                replica.kill()
                replica.close_channels()
