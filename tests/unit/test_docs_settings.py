"""The documents keep up with the code: every setting is in docs/configuration.md."""

from __future__ import annotations

import pytest

from client.kms_client import CONNECTION_SETTINGS
from server import config
from tests.conftest import REPO

CONFIGURATION = (REPO / "docs" / "configuration.md").read_text()
SERVER_SETTINGS = [(flag, env) for flag, env, _ in [*config._SETTINGS, *config._FLAGS]]
CLIENT_SETTINGS = [(flag, env) for flag, _, env, _ in CONNECTION_SETTINGS]


@pytest.mark.parametrize(("flag", "env"), SERVER_SETTINGS + CLIENT_SETTINGS)
def test_every_setting_and_its_variable_is_documented(flag: str, env: str) -> None:
    assert f"`{flag}`" in CONFIGURATION
    assert f"`{env}`" in CONFIGURATION


def test_the_readme_stays_short() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize(
    "document",
    ["security-model.md", "configuration.md", "cli.md", "operations.md", "archive-format.md"],
)
def test_the_readme_links_every_document(document: str) -> None:
    assert f"(docs/{document})" in (REPO / "README.md").read_text()
