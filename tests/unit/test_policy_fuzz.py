"""The policy parser, fuzzed: whatever a file holds, the answer is a policy or a PolicyError.

Anything else (TypeError from `roles = 5`, say) would escape a SIGHUP reload and kill the
server process, in every worker at once under --processes.
"""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from server.policy import Policy, PolicyError, hash_token

# What TOML can hold, with the policy's own words mixed in so the fuzzer reaches deep.
WORDS = st.sampled_from(
    [
        "principals",
        "auth",
        "token",
        "certificate",
        "token_sha256",
        "grants",
        "roles",
        "keys",
        "admin",
        "backup",
        "restore",
        "auditor",
        "*",
        "tenant-*",
        hash_token("t"),
        "ops",
        "",
    ]
)
SCALARS = st.one_of(
    WORDS,
    st.text(max_size=8),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(WORDS | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=24,
)


def _parse(document: Any) -> None:
    with contextlib.suppress(PolicyError):
        Policy.parse(document)


@settings(max_examples=400, deadline=None)
@given(VALUES)
def test_any_document_parses_or_raises_policy_error(document: Any) -> None:
    _parse(document)
    _parse({"principals": document})
    _parse({"principals": {"ops": document}})
    _parse({"principals": {"ops": {"auth": ["certificate"], "grants": document}}})
    _parse({"principals": {"ops": {"auth": ["certificate"], "grants": [document]}}})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_file_loads_or_raises_policy_error(tmp_path_factory: Any, data: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "policy.toml"
    path.write_bytes(data)
    with contextlib.suppress(PolicyError):
        Policy.load(path)


VALID = f"""[principals.ops]
auth = ["token"]
token_sha256 = ["{hash_token("t")}"]

[[principals.ops.grants]]
roles = ["admin"]
keys = ["a-*"]
"""


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(VALID)), st.text(max_size=20))
def test_a_valid_file_cut_or_spliced_anywhere_loads_or_raises_policy_error(
    tmp_path_factory: Any, cut: int, splice: str
) -> None:
    path = Path(tmp_path_factory.mktemp("cut")) / "policy.toml"
    path.write_text(VALID[:cut] + splice, errors="surrogatepass")
    try:
        Policy.load(path)
    except (PolicyError, tomllib.TOMLDecodeError) as error:
        assert isinstance(error, PolicyError), "TOML errors come wrapped"
