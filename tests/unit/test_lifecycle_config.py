"""--destroy-delay: durations, the default, and the 24-hour minimum outside dev mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import config
from server.config import ConfigError


def parse(*argv: str, **environ: str) -> config.ServerSettings:
    return config.parse(list(argv), environ=environ)


def test_the_default_delay_is_seven_days(tmp_path: Path) -> None:
    assert parse("--dev", "--data-dir", str(tmp_path)).destroy_delay_seconds == 7 * 86400


@pytest.mark.parametrize(
    "raw, seconds", [("30s", 30), ("15m", 900), ("24h", 86400), ("7d", 604800), ("0s", 0)]
)
def test_dev_mode_takes_any_duration(tmp_path: Path, raw: str, seconds: int) -> None:
    settings = parse("--dev", "--data-dir", str(tmp_path), "--destroy-delay", raw)
    assert settings.destroy_delay_seconds == seconds


def test_outside_dev_mode_the_delay_is_at_least_a_day(tmp_path: Path) -> None:
    base = ["--data-dir", str(tmp_path), "--insecure", "--listen", "127.0.0.1:0"]
    assert parse(*base, "--destroy-delay", "24h").destroy_delay_seconds == 86400
    assert parse(*base, KMS_DESTROY_DELAY="30d").destroy_delay_seconds == 30 * 86400
    with pytest.raises(ConfigError, match="at least 24h"):
        parse(*base, "--destroy-delay", "23h")


@pytest.mark.parametrize("raw", ["", "7", "1w", "-1d", "1.5h", "d", "7 d 1"])
def test_a_malformed_delay_is_refused_naming_the_setting(tmp_path: Path, raw: str) -> None:
    with pytest.raises(ConfigError, match="--destroy-delay"):
        parse("--dev", "--data-dir", str(tmp_path), KMS_DESTROY_DELAY=raw)
