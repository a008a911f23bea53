"""The policy file: principals, how they authenticate, their scoped grants, and every way it
can be wrong."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from server.domain.model import Role
from server.policy import Policy, PolicyError, hash_token

ADMIN_TOKEN = "admin-token-value"


def valid_document() -> dict[str, Any]:
    return {
        "principals": {
            "ops-admin": {
                "auth": ["token"],
                "token_sha256": [hash_token(ADMIN_TOKEN)],
                "grants": [{"roles": ["admin", "auditor"], "keys": ["*"]}],
            },
            "backup-agent": {
                "auth": ["certificate"],
                "grants": [{"roles": ["backup"], "keys": ["tenant-a", "tenant-a-*"]}],
            },
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


def test_a_certificate_naming_a_token_only_principal_is_no_way_in() -> None:
    assert Policy.parse(valid_document()).principal_for_certificate("ops-admin") is None


def test_a_principal_may_use_both_ways_in() -> None:
    document = valid_document()
    document["principals"]["ops-admin"]["auth"] = ["token", "certificate"]
    policy = Policy.parse(document)
    assert policy.principal_for_certificate("ops-admin") is policy.principal_for_token(ADMIN_TOKEN)


def test_scopes_hold_exact_names_and_star_patterns_per_role() -> None:
    policy = Policy.parse(valid_document())
    agent = policy.principals["backup-agent"]
    scope = agent.scope(Role.BACKUP)
    assert scope.allows("tenant-a") and scope.allows("tenant-a-db") and scope.allows("tenant-a-")
    for outside in ("tenant-b", "tenant-ab", "xtenant-a", "tenant-a.db", "tenant"):
        assert not scope.allows(outside), outside
    assert not agent.scope(Role.RESTORE).allows("tenant-a"), "no grant, no key"
    admin = policy.principals["ops-admin"]
    assert admin.scope(Role.ADMIN).everything and admin.scope(Role.AUDITOR).allows("anything")


def test_a_star_in_the_middle_and_a_regex_character_are_literal_but_the_star() -> None:
    document = valid_document()
    document["principals"]["backup-agent"]["grants"] = [
        {"roles": ["backup"], "keys": ["db.*-prod"]}
    ]
    scope = Policy.parse(document).principals["backup-agent"].scope(Role.BACKUP)
    assert scope.allows("db.eu-prod") and scope.allows("db.-prod")
    assert not scope.allows("dbx-prod"), "the dot is a dot, not any character"
    assert not scope.allows("db.eu-prod2")


def test_grants_for_the_same_role_add_up() -> None:
    document = valid_document()
    document["principals"]["backup-agent"]["grants"] = [
        {"roles": ["backup"], "keys": ["a"]},
        {"roles": ["backup", "restore"], "keys": ["b-*"]},
    ]
    agent = Policy.parse(document).principals["backup-agent"]
    assert agent.scope(Role.BACKUP).allows("a") and agent.scope(Role.BACKUP).allows("b-1")
    assert agent.scope(Role.RESTORE).allows("b-1") and not agent.scope(Role.RESTORE).allows("a")


def test_token_hashes_are_matched_case_insensitively() -> None:
    document = valid_document()
    document["principals"]["ops-admin"]["token_sha256"] = [hash_token("t").upper()]
    principal = Policy.parse(document).principal_for_token("t")
    assert principal is not None and principal.name == "ops-admin"


def test_the_policy_repr_does_not_show_token_hashes() -> None:
    assert hash_token(ADMIN_TOKEN) not in repr(Policy.parse(valid_document()))


def test_an_empty_policy_has_no_principals() -> None:
    assert Policy.parse({}).principals == {}


def _with(change: dict[str, Any]) -> dict[str, Any]:
    """The valid document with ops-admin's entry changed (None deletes a setting)."""
    document = copy.deepcopy(valid_document())
    entry = document["principals"]["ops-admin"]
    for name, value in change.items():
        if value is None:
            entry.pop(name, None)
        else:
            entry[name] = value
    return document


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ({"principal": {}}, "unknown setting"),
        ({"principals": ["a"]}, "must be a table"),
        ({"principals": {"p": "admin"}}, "must be a table"),
        (_with({"token": "x"}), "unknown setting"),
        (_with({"roles": ["admin"]}), r"roles go in grants.*keys"),
        (_with({"auth": None}), r'add auth = \["token"\]'),
        (_with({"auth": []}), "auth lists one or both"),
        (_with({"auth": ["password"]}), "auth lists one or both"),
        (_with({"auth": "token"}), "auth must be a list of strings"),
        (_with({"auth": ["certificate"]}), 'does not include "token"'),
        (_with({"token_sha256": None}), "lists no token hash"),
        (_with({"token_sha256": ["abc"]}), "64 hex"),
        (_with({"token_sha256": ["z" * 64]}), "64 hex"),
        (_with({"token_sha256": [42]}), "64 hex"),
        (_with({"token_sha256": "a" * 64}), "64 hex"),
        (_with({"grants": {"roles": ["admin"]}}), "array of tables"),
        (_with({"grants": ["admin"]}), "grant 1 must be a table"),
        (_with({"grants": [{"roles": ["admin"]}]}), r'grant 1: add keys = \["..."\]'),
        (_with({"grants": [{"roles": ["admin"], "keys": []}]}), "keys lists no key"),
        (_with({"grants": [{"roles": ["admin"], "keys": "*"}]}), "keys must be a list"),
        (_with({"grants": [{"roles": ["admin"], "keys": ["a/b"]}]}), "not a key name"),
        (_with({"grants": [{"roles": ["admin"], "keys": ["-x"]}]}), "not a key name"),
        (_with({"grants": [{"roles": ["root"], "keys": ["*"]}]}), "roles must be among"),
        (_with({"grants": [{"roles": 5, "keys": ["*"]}]}), "roles must be a list"),
        (_with({"grants": [{"roles": [], "keys": ["*"]}]}), "add roles"),
        (_with({"grants": [{"roles": ["admin"], "keys": ["*"], "x": 1}]}), "unknown setting"),
    ],
    ids=[
        "unknown-top-level",
        "principals-not-table",
        "principal-not-table",
        "unknown-principal-setting",
        "roles-outside-grants",
        "auth-missing",
        "auth-empty",
        "auth-unknown",
        "auth-not-list",
        "hashes-without-token-auth",
        "token-auth-without-hashes",
        "short-hash",
        "non-hex-hash",
        "hash-not-string",
        "hashes-not-list",
        "grants-not-array",
        "grant-not-table",
        "grant-without-keys",
        "grant-with-no-keys",
        "keys-not-list",
        "key-with-slash",
        "key-starting-badly",
        "unknown-role",
        "roles-not-list",
        "grant-without-roles",
        "unknown-grant-setting",
    ],
)
def test_an_invalid_policy_is_refused_with_a_reason(
    document: dict[str, object], complaint: str
) -> None:
    with pytest.raises(PolicyError, match=complaint):
        Policy.parse(document, "policy.toml")


def test_a_token_hash_listed_twice_is_refused() -> None:
    document = valid_document()
    document["principals"]["backup-agent"]["auth"] = ["token"]
    document["principals"]["backup-agent"]["token_sha256"] = [hash_token(ADMIN_TOKEN).upper()]
    with pytest.raises(PolicyError, match="listed twice"):
        Policy.parse(document)


GRANTED_POLICY = f"""
[principals.ops]
auth = ["token"]
token_sha256 = ["{hash_token(ADMIN_TOKEN)}"]

[[principals.ops.grants]]
roles = ["admin"]
keys = ["tenant-a", "tenant-a-*"]
"""


def test_load_reads_the_documented_toml_shape(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GRANTED_POLICY)
    principal = Policy.load(path).principal_for_token(ADMIN_TOKEN)
    assert principal is not None and principal.name == "ops"
    assert principal.scope(Role.ADMIN).allows("tenant-a-x")
    assert not principal.scope(Role.ADMIN).allows("tenant-b")


def test_load_refuses_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[principals.ops\nroles = ")
    with pytest.raises(PolicyError, match="not valid TOML"):
        Policy.load(path)


def test_load_refuses_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(b"[principals.\xff]\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.load(path)


def test_load_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path / "missing.toml")


def test_load_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path)


def test_a_file_cut_inside_a_grant_is_refused(tmp_path: Path) -> None:
    """A half-written file: cut before the grant's keys, it still parses as TOML."""
    path = tmp_path / "policy.toml"
    path.write_text(GRANTED_POLICY[: GRANTED_POLICY.index("keys =")])
    with pytest.raises(PolicyError, match="add keys"):
        Policy.load(path)


@pytest.mark.parametrize("name", ["", "x" * 129, "has space", "new\nline", "-leading"])
def test_a_principal_name_that_cannot_be_audited_is_refused(name: str) -> None:
    with pytest.raises(PolicyError, match="principal name"):
        Policy.parse({"principals": {name: {"auth": ["certificate"]}}})


def test_dev_mode_writes_token_only_principals_with_explicit_every_key_grants(
    tmp_path: Path,
) -> None:
    from server import config, devmode

    settings = config.parse(["--dev", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"], {})
    devmode.bootstrap(settings)
    text = settings.policy_file.read_text()
    assert text.count('keys = ["*"]') == len(Role) and "roles = [" in text
    policy = Policy.load(settings.policy_file)
    for role in Role:
        principal = policy.principals[f"dev-{role.value}"]
        assert principal.roles == frozenset({role})
        assert principal.scope(role).everything
        assert policy.principal_for_certificate(principal.name) is None


def test_destroy_approvals_defaults_to_one_and_takes_only_one_or_two() -> None:
    assert Policy.parse({}).destroy_approvals == 1
    assert Policy.parse({"destroy_approvals": 2}).destroy_approvals == 2
    for bad in (0, 3, "2", True):
        with pytest.raises(PolicyError, match="destroy_approvals"):
            Policy.parse({"destroy_approvals": bad})
