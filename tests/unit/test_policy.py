"""The policy file: principals, roles and token hashes, and every way it can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.domain.model import Role
from server.policy import Policy, PolicyError, hash_token

ADMIN_TOKEN = "admin-token-value"


def valid_document() -> dict[str, object]:
    return {
        "principals": {
            "ops-admin": {"roles": ["admin", "auditor"], "token_sha256": [hash_token(ADMIN_TOKEN)]},
            "backup-agent": {"roles": ["backup"]},
        }
    }


def test_a_valid_policy_maps_tokens_and_certificates_to_principals() -> None:
    policy = Policy.parse(valid_document())
    admin = policy.principal_for_token(ADMIN_TOKEN)
    assert admin is not None
    assert admin.name == "ops-admin"
    assert admin.roles == frozenset({Role.ADMIN, Role.AUDITOR})
    assert policy.principal_for_token("wrong") is None
    assert policy.principal_for_token("") is None
    agent = policy.principal_for_certificate("backup-agent")
    assert agent is not None and agent.roles == frozenset({Role.BACKUP})
    assert policy.principal_for_certificate("stranger") is None


def test_token_hashes_are_matched_case_insensitively() -> None:
    document: dict[str, object] = {
        "principals": {"p": {"roles": ["admin"], "token_sha256": [hash_token("t").upper()]}}
    }
    principal = Policy.parse(document).principal_for_token("t")
    assert principal is not None and principal.name == "p"


def test_the_policy_repr_does_not_show_token_hashes() -> None:
    assert hash_token(ADMIN_TOKEN) not in repr(Policy.parse(valid_document()))


def test_an_empty_policy_has_no_principals() -> None:
    assert Policy.parse({}).principals == {}


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ({"principal": {}}, "unknown setting"),
        ({"principals": ["a"]}, "must be a table"),
        ({"principals": {"p": "admin"}}, "must be a table"),
        ({"principals": {"p": {"roles": ["admin"], "token": "x"}}}, "unknown setting"),
        ({"principals": {"p": {"roles": ["root"]}}}, "roles must be among"),
        ({"principals": {"p": {"roles": "admin"}}}, "roles"),
        ({"principals": {"p": {"roles": ["admin"], "token_sha256": ["abc"]}}}, "64 hex"),
        ({"principals": {"p": {"roles": ["admin"], "token_sha256": ["z" * 64]}}}, "64 hex"),
        ({"principals": {"p": {"roles": ["admin"], "token_sha256": [42]}}}, "64 hex"),
        ({"principals": {"p": {"roles": ["admin"], "token_sha256": "a" * 64}}}, "64 hex"),
    ],
    ids=[
        "unknown-top-level",
        "principals-not-table",
        "principal-not-table",
        "unknown-principal-setting",
        "unknown-role",
        "roles-not-list",
        "short-hash",
        "non-hex-hash",
        "hash-not-string",
        "hashes-not-list",
    ],
)
def test_an_invalid_policy_is_refused_with_a_reason(
    document: dict[str, object], complaint: str
) -> None:
    with pytest.raises(PolicyError, match=complaint):
        Policy.parse(document, "policy.toml")


def test_a_token_hash_listed_twice_is_refused() -> None:
    digest = hash_token("shared")
    document: dict[str, object] = {
        "principals": {
            "a": {"roles": ["admin"], "token_sha256": [digest]},
            "b": {"roles": ["backup"], "token_sha256": [digest.upper()]},
        }
    }
    with pytest.raises(PolicyError, match="listed twice"):
        Policy.parse(document)


def test_load_reads_toml(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        f'[principals.ops]\nroles = ["admin"]\ntoken_sha256 = ["{hash_token(ADMIN_TOKEN)}"]\n'
    )
    principal = Policy.load(path).principal_for_token(ADMIN_TOKEN)
    assert principal is not None and principal.name == "ops"


def test_load_refuses_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[principals.ops\nroles = ")
    with pytest.raises(PolicyError, match="not valid TOML"):
        Policy.load(path)


def test_load_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path / "missing.toml")


@pytest.mark.parametrize("name", ["", "x" * 129, "has space", "new\nline", "-leading"])
def test_a_principal_name_that_cannot_be_audited_is_refused(name: str) -> None:
    with pytest.raises(PolicyError, match="principal name"):
        Policy.parse({"principals": {name: {"roles": ["admin"]}}})


def test_destroy_approvals_defaults_to_one_and_takes_only_one_or_two() -> None:
    assert Policy.parse({}).destroy_approvals == 1
    assert Policy.parse({"destroy_approvals": 2}).destroy_approvals == 2
    for bad in (0, 3, "2", True):
        with pytest.raises(PolicyError, match="destroy_approvals"):
            Policy.parse({"destroy_approvals": bad})
