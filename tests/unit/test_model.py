"""The validation rules of the domain model."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server.domain import model
from server.domain.errors import InvalidArgument


def reason(check: Callable[..., object], *args: object) -> str:
    with pytest.raises(InvalidArgument) as caught:
        check(*args)
    return caught.value.reason


@pytest.mark.parametrize("name", ["a", "A", "0", "tenant-a", "t.a_b-c", "k" * 128])
def test_valid_key_names(name: str) -> None:
    assert model.check_key_name(name) == name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "KEY_NAME_MISSING"),
        ("-a", "KEY_NAME_INVALID"),
        (".a", "KEY_NAME_INVALID"),
        ("a:b", "KEY_NAME_INVALID"),
        ("a b", "KEY_NAME_INVALID"),
        ("a\n", "KEY_NAME_INVALID"),
        ("é", "KEY_NAME_INVALID"),
        ("٣", "KEY_NAME_INVALID"),
        ("k" * 129, "KEY_NAME_INVALID"),
    ],
)
def test_invalid_key_names(name: str, expected: str) -> None:
    assert reason(model.check_key_name, name) == expected


@pytest.mark.parametrize("backup_id", ["b", "2026-01-01T00:00:00", "0b7c1f0e-4b0a", "b" * 128])
def test_valid_backup_ids(backup_id: str) -> None:
    assert model.check_backup_id(backup_id) == backup_id


@pytest.mark.parametrize(
    ("backup_id", "expected"),
    [
        ("", "BACKUP_ID_MISSING"),
        (":a", "BACKUP_ID_INVALID"),
        ("a/b", "BACKUP_ID_INVALID"),
        ("a\x00", "BACKUP_ID_INVALID"),
        ("b" * 129, "BACKUP_ID_INVALID"),
    ],
)
def test_invalid_backup_ids(backup_id: str, expected: str) -> None:
    assert reason(model.check_backup_id, backup_id) == expected


@pytest.mark.parametrize("version", [1, 2, model.MAX_VERSION])
def test_valid_versions(version: int) -> None:
    assert model.check_version(version) == version


@pytest.mark.parametrize("version", [0, -1, model.MAX_VERSION + 1, 2**32 - 1])
def test_invalid_versions(version: int) -> None:
    assert reason(model.check_version, version) == "VERSION_INVALID"


@pytest.mark.parametrize(
    "text", ["", "scheduled rotation", "ü" * 1024, "عربي", "emoji \U0001f511", "a b"]
)
def test_valid_reasons(text: str) -> None:
    assert model.check_reason(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x" * 1025, "REASON_TOO_LONG"),
        ("a\nb", "REASON_INVALID"),
        ("a\x00", "REASON_INVALID"),
        ("\x1b[31m", "REASON_INVALID"),
        ("del\x7f", "REASON_INVALID"),
        ("c1\x9b31m", "REASON_INVALID"),
        ("tab\tno", "REASON_INVALID"),
        ("evil\u202eenil", "REASON_INVALID"),  # right-to-left override
        ("zero\u200bwidth", "REASON_INVALID"),
        ("bom\ufeff", "REASON_INVALID"),
        ("line\u2028sep", "REASON_INVALID"),
        ("para\u2029sep", "REASON_INVALID"),
    ],
)
def test_invalid_reasons(text: str, expected: str) -> None:
    assert reason(model.check_reason, text) == expected


@pytest.mark.parametrize(("size", "expected"), [(0, 100), (1, 1), (1000, 1000), (5000, 1000)])
def test_page_sizes_default_to_100_and_cap_at_1000(size: int, expected: int) -> None:
    assert model.check_page_size(size) == expected


@pytest.mark.parametrize(
    ("token", "expected"), [("", 0), ("0", 0), ("42", 42), (str(2**63 - 1), 2**63 - 1)]
)
def test_valid_page_tokens(token: str, expected: int) -> None:
    assert model.check_page_token(token) == expected


@pytest.mark.parametrize(
    "token", ["x", "-1", "+1", " 1", "1 ", "²", "١٢", str(2**63), "9" * 20, "1" * 5000]
)
def test_invalid_page_tokens(token: str) -> None:
    assert reason(model.check_page_token, token) == "PAGE_TOKEN_INVALID"


def test_data_key_repr_never_shows_the_key() -> None:
    secret = bytes(range(32))
    key = model.DataKey("b1", "tenant-a", 2, secret, b"wrapped-blob")
    shown = repr(key) + str(key)
    assert secret.hex() not in shown and repr(secret) not in shown and "wrapped" not in shown
    assert "b1" in shown
