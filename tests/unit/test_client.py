"""The client's options, credentials handling and retry policy (no server needed)."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import grpc
import pytest

from client.kms_client import (
    ClientConfig,
    ConfigError,
    KmsClient,
    KmsError,
    add_connection_args,
    config_from_args,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_connection_args(parser)
    return parser.parse_args(argv)


def closed_port_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_token_file_wins_over_the_environment_and_is_stripped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMS_TOKEN", "from-env")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert config_from_args(parse(["--token-file", str(token_file)])).token == "from-file"


def test_token_comes_from_kms_token_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMS_TOKEN_FILE", raising=False)
    monkeypatch.setenv("KMS_TOKEN", "from-env")
    assert config_from_args(parse([])).token == "from-env"


def test_address_defaults_to_localhost_and_follows_kms_addr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KMS_ADDR", raising=False)
    assert config_from_args(parse([])).addr == "127.0.0.1:50051"
    monkeypatch.setenv("KMS_ADDR", "kms.internal:443")
    assert config_from_args(parse([])).addr == "kms.internal:443"


def test_missing_token_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        config_from_args(parse(["--token-file", str(tmp_path / "nope")]))


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        config_from_args(parse(["--token-file", str(tmp_path / "token")]))


def test_client_certificate_without_a_ca_is_refused(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    argv = ["--cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    with pytest.raises(ConfigError, match="--ca"):
        config_from_args(parse(argv))


def test_certificate_without_its_private_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ConfigError, match="together"):
        config_from_args(parse(["--cert", str(tmp_path / "cert.pem")]))


def test_config_repr_never_shows_the_token() -> None:
    config = ClientConfig(token="s3cret-token", key=b"PRIVATE KEY")
    assert "s3cret-token" not in repr(config)
    assert "PRIVATE" not in repr(config)


def test_safe_calls_are_retried_on_unavailable_with_growing_backoff() -> None:
    sleeps: list[float] = []
    config = ClientConfig(addr=closed_port_address(), token="t", timeout=2, retries=3)
    with KmsClient(config, sleep=sleeps.append) as client, pytest.raises(KmsError) as caught:
        client.get_active_key("tenant-a", "backup-1")
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert len(sleeps) == 3
    assert all(0 <= pause <= 2.0 for pause in sleeps)


@pytest.mark.parametrize("call", ["register", "rotate", "disable", "enable", "destroy"])
def test_state_changing_calls_are_never_retried(call: str) -> None:
    sleeps: list[float] = []
    config = ClientConfig(addr=closed_port_address(), token="t", timeout=2, retries=3)
    with KmsClient(config, sleep=sleeps.append) as client, pytest.raises(KmsError) as caught:
        if call == "register":
            client.register_key_version("tenant-a")
        elif call == "rotate":
            client.rotate_active("tenant-a", 2)
        elif call == "disable":
            client.disable_key_version("tenant-a", 1)
        elif call == "enable":
            client.enable_key_version("tenant-a", 1)
        else:
            client.destroy_key_version("tenant-a", 1)
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert sleeps == []


def test_kms_error_carries_code_reason_and_message() -> None:
    error = KmsError(grpc.StatusCode.FAILED_PRECONDITION, "KEY_VERSION_DESTROYED", "v1 destroyed")
    assert (error.code, error.reason, error.message) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "KEY_VERSION_DESTROYED",
        "v1 destroyed",
    )
    assert str(error) == "FAILED_PRECONDITION KEY_VERSION_DESTROYED: v1 destroyed"
