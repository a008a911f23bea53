"""Server settings: flags over environment, and refusals that name the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server import config
from server.config import ConfigError


def parse(*argv: str, **environ: str) -> config.ServerSettings:
    return config.parse(list(argv), environ=environ)


def test_dev_mode_defaults(tmp_path: Path) -> None:
    settings = parse("--dev", "--data-dir", str(tmp_path))
    assert settings.listen == config.DEFAULT_LISTEN
    assert settings.insecure and settings.dev and not settings.uses_tls
    assert settings.database_url == f"sqlite+pysqlite:///{(tmp_path / 'kms.sqlite3').resolve()}"
    assert settings.root_key_file == tmp_path / "root.key"
    assert settings.policy_file == tmp_path / "policy.toml"
    assert settings.log_level == "INFO"


def test_flags_win_over_the_environment(tmp_path: Path) -> None:
    settings = parse(
        "--data-dir",
        str(tmp_path),
        "--insecure",
        "--listen",
        "127.0.0.1:7000",
        KMS_LISTEN="127.0.0.1:8000",
        KMS_MAX_WORKERS="3",
        KMS_LOG_LEVEL="debug",
    )
    assert settings.listen == "127.0.0.1:7000"
    assert settings.max_workers == 3
    assert settings.log_level == "DEBUG"


def test_statement_timeout_and_shutdown_grace_have_defaults_and_settings(tmp_path: Path) -> None:
    defaults = parse("--dev", "--data-dir", str(tmp_path))
    assert (defaults.db_statement_timeout_ms, defaults.shutdown_grace_seconds) == (5000, 10)
    settings = parse(
        "--dev",
        "--data-dir",
        str(tmp_path),
        "--db-statement-timeout-ms",
        "250",
        KMS_SHUTDOWN_GRACE_SECONDS="30",
    )
    assert (settings.db_statement_timeout_ms, settings.shutdown_grace_seconds) == (250, 30)


def test_processes_default_to_one_and_auto_means_one_per_cpu(tmp_path: Path) -> None:
    assert parse("--dev", "--data-dir", str(tmp_path)).processes == 1
    assert parse("--dev", "--data-dir", str(tmp_path), "--processes", "3").processes == 3
    auto = parse("--dev", "--data-dir", str(tmp_path), KMS_PROCESSES="auto")
    assert auto.processes == (os.cpu_count() or 1)
    assert auto.process_index is None, "only a supervisor's processes have an index"


def test_the_environment_alone_configures_the_server(tmp_path: Path) -> None:
    settings = parse(KMS_DATA_DIR=str(tmp_path), KMS_INSECURE="true", KMS_LISTEN="[::1]:9000")
    assert settings.insecure and settings.listen == "[::1]:9000"


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051", "kms.example.com:1"]
)
def test_plaintext_on_a_non_loopback_address_is_refused(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match="refusing plaintext"):
        parse("--data-dir", str(tmp_path), "--insecure", "--listen", listen)
    with pytest.raises(ConfigError, match="refusing plaintext"):
        parse("--dev", "--data-dir", str(tmp_path), "--listen", listen)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.2:1", "localhost:50051", "[::1]:50051"])
def test_plaintext_on_loopback_needs_insecure(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match="refusing to serve without TLS"):
        parse("--data-dir", str(tmp_path), "--listen", listen)
    assert parse("--data-dir", str(tmp_path), "--insecure", "--listen", listen).insecure


def test_tls_on_any_address_needs_no_insecure(tmp_path: Path) -> None:
    settings = parse(
        "--data-dir",
        str(tmp_path),
        "--listen",
        "0.0.0.0:443",
        "--tls-cert",
        "cert.pem",
        "--tls-key",
        "key.pem",
    )
    assert settings.uses_tls and not settings.insecure


D = "--data-dir=DATA"  # replaced by the test's temporary directory


@pytest.mark.parametrize(
    ("argv", "environ", "complaint"),
    [
        ([], {}, "--data-dir"),
        (["--dev", "--database-url", "postgresql://db/kms"], {}, "--data-dir"),
        ([D, "--insecure", "--tls-cert", "c.pem"], {}, "go together"),
        ([D, "--insecure", "--tls-key", "k.pem"], {}, "go together"),
        ([D, "--insecure", "--tls-client-ca", "ca.pem"], {}, "--tls-client-ca needs"),
        ([D, "--insecure", "--max-workers", "0"], {}, "--max-workers"),
        ([D, "--insecure", "--max-workers", "-3"], {}, "--max-workers"),
        ([D, "--insecure", "--db-pool-size", "many"], {}, "--db-pool-size"),
        ([D, "--insecure"], {"KMS_MAX_WORKERS": "1.5"}, "KMS_MAX_WORKERS"),
        ([D, "--insecure", "--db-statement-timeout-ms", "0"], {}, "--db-statement-timeout-ms"),
        ([D, "--insecure"], {"KMS_SHUTDOWN_GRACE_SECONDS": "soon"}, "KMS_SHUTDOWN_GRACE"),
        ([D, "--insecure", "--log-level", "verbose"], {}, "--log-level"),
        ([D, "--insecure", "--listen", "127.0.0.1"], {}, "host:port"),
        ([D, "--insecure", "--listen", "127.0.0.1:99999"], {}, "from 0 to 65535"),
        ([D, "--insecure", "--listen", "127.0.0.1:http"], {}, "host:port"),
        ([D], {"KMS_INSECURE": "maybe"}, "KMS_INSECURE"),
        ([D], {"KMS_DEV": "2"}, "KMS_DEV"),
        ([D, "--insecure", "--processes", "0"], {}, "--processes"),
        ([D, "--insecure"], {"KMS_PROCESSES": "all"}, "KMS_PROCESSES"),
    ],
)
def test_invalid_settings_are_refused_naming_the_setting(
    tmp_path: Path, argv: list[str], environ: dict[str, str], complaint: str
) -> None:
    argv = [arg.replace("DATA", str(tmp_path)) for arg in argv]
    with pytest.raises(ConfigError, match=complaint):
        config.parse(argv, environ=environ)


def test_a_database_url_alone_needs_no_data_dir() -> None:
    settings = parse("--insecure", "--database-url", "postgresql://db/kms")
    assert settings.database_url == "postgresql://db/kms"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("no", False), ("", False)],
)
def test_switches_read_from_the_environment(tmp_path: Path, raw: str, expected: bool) -> None:
    environ = {"KMS_DATA_DIR": str(tmp_path), "KMS_DEV": raw, "KMS_INSECURE": "1"}
    assert config.parse([], environ=environ).dev is expected


def test_every_bad_setting_gets_its_own_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        parse("--data-dir", str(tmp_path), "--insecure", "--max-workers", "0", "--log-level", "x")
    lines = str(refused.value).splitlines()
    assert len(lines) == 2
    assert any(line.startswith("--max-workers") for line in lines)
    assert any(line.startswith("--log-level") for line in lines)


@pytest.mark.parametrize("listen", [":9100", "0.0.0.0:9100", "[::]:9100", "10.0.0.5:9100"])
def test_metrics_off_loopback_need_metrics_allow_remote(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match="--metrics-allow-remote"):
        parse("--dev", "--data-dir", str(tmp_path), "--metrics-listen", listen)
    allowed = parse(
        "--dev", "--data-dir", str(tmp_path), "--metrics-listen", listen, "--metrics-allow-remote"
    )
    assert allowed.metrics_allow_remote and allowed.metrics_listen == listen
    assert parse(
        "--dev",
        "--data-dir",
        str(tmp_path),
        KMS_METRICS_LISTEN=listen,
        KMS_METRICS_ALLOW_REMOTE="1",
    ).metrics_allow_remote


def test_processes_are_capped_at_four_per_cpu(tmp_path: Path) -> None:
    cap = config.MAX_PROCESSES_PER_CPU * (os.cpu_count() or 1)
    assert parse("--dev", "--data-dir", str(tmp_path), "--processes", str(cap)).processes == cap
    with pytest.raises(ConfigError, match=f"from 1 to {cap}"):
        parse("--dev", "--data-dir", str(tmp_path), "--processes", str(cap + 1))


@pytest.mark.parametrize(
    "url", ["postgresql://kms@db/kms", "postgresql+psycopg://db/kms", "sqlite:////var/kms.db"]
)
def test_supported_database_urls_pass(url: str) -> None:
    assert config.database_url_problem(url) is None


@pytest.mark.parametrize(
    "url", ["notaurl", "mysql://db/kms", "postgresql+psycopg2://db/kms", "sqlite://"]
)
def test_unsupported_database_urls_are_named_without_the_password(url: str) -> None:
    problem = config.database_url_problem(url.replace("//", "//user:hunter2@", 1))
    assert problem is not None and "--database-url" in problem and "hunter2" not in problem


def test_file_settings_must_be_small_regular_files(tmp_path: Path) -> None:
    settings = parse(
        "--data-dir", str(tmp_path), "--insecure", "--root-key-file", "/dev/zero"
    )  # fmt: skip
    (tmp_path / "policy.toml").write_text("")
    with pytest.raises(ConfigError, match=r"--root-key-file .* is not a regular file"):
        config.check_files(settings)
    big = tmp_path / "big.key"
    big.write_bytes(b"x" * (config.MAX_ROOT_KEY_FILE_BYTES + 1))
    settings = parse("--data-dir", str(tmp_path), "--insecure", "--root-key-file", str(big))
    with pytest.raises(ConfigError, match="larger than"):
        config.check_files(settings)


def test_database_errors_are_one_line_without_the_password() -> None:
    from sqlalchemy.exc import OperationalError

    from server.main import _database_problem

    error = OperationalError("SELECT 1", {}, Exception("failed for s3cret-pw\nsecond line"))
    text = _database_problem(error, "postgresql://kms:s3cret-pw@db/kms")
    assert "s3cret-pw" not in text and "\n" not in text
    assert text.startswith("cannot use the database (--database-url")
