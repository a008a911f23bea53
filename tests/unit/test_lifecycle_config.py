"""--destroy-delay: durations, the default, and the 24-hour minimum outside dev mode.
--max-data-keys-per-version: its default and its range."""

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


def test_a_version_wraps_at_most_two_to_the_thirty_data_keys_by_default(tmp_path: Path) -> None:
    assert parse("--dev", "--data-dir", str(tmp_path)).max_data_keys_per_version == 2**30
    settings = parse("--dev", "--data-dir", str(tmp_path), KMS_MAX_DATA_KEYS_PER_VERSION="1000")
    assert settings.max_data_keys_per_version == 1000


# The last: fullwidth digits, which str.isdigit() takes.
@pytest.mark.parametrize("raw", ["999", "0", str(2**31 + 1), "1e6", "-5", "", "\uff11" * 4])
def test_a_data_key_bound_out_of_range_is_refused_naming_the_setting(
    tmp_path: Path, raw: str
) -> None:
    expected = r"--max-data-keys-per-version .* from 1000 to 2147483648"
    with pytest.raises(ConfigError, match=expected):
        parse("--dev", "--data-dir", str(tmp_path), "--max-data-keys-per-version", raw)
