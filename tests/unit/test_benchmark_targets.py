"""The benchmark's targets: age for the archives, OpenBao for the RPCs (figures made up here)."""

from __future__ import annotations

from typing import Any

from benchmarks.run import TARGETS, age_ratios, ratios


def _results() -> dict[str, Any]:
    def figures(mb_per_s: float, rss: float = 50.0) -> dict[str, float]:
        return {"mb_per_s": mb_per_s, "median_mb_per_s": mb_per_s, "peak_rss_mib": rss}

    return {
        "archives": {
            "age": {
                "random": {
                    "kms_encrypt": figures(1200, rss=70.0),
                    "age_encrypt": figures(1000),
                    "kms_decrypt_file": figures(900),
                    "age_decrypt_file": figures(1000),
                    "kms_decrypt_stdout": figures(2000),
                    "age_decrypt_stdout": figures(1000),
                },
                "text": {
                    "kms_encrypt": figures(100),
                    "zstd_age_encrypt": figures(125),
                    "kms_archive_bytes": 300,
                    "zstd_age_archive_bytes": 400,
                },
            }
        }
    }


def test_age_ratios_are_ours_over_theirs() -> None:
    out = age_ratios(_results())
    assert out["archive_encrypt_vs_age"] == 1.2
    assert out["archive_decrypt_file_vs_age"] == 0.9
    assert out["archive_decrypt_stdout_vs_age"] == 2.0
    assert out["text_encrypt_vs_zstd_age"] == 0.8
    assert out["text_archive_size_vs_zstd_age"] == 0.75


def test_the_age_runs_count_towards_peak_rss_and_missing_figures_stay_none() -> None:
    assert ratios(_results())["archive_peak_rss_mib"] == 70.0
    assert age_ratios({})["archive_encrypt_vs_age"] is None


def test_targets_are_age_and_openbao_not_the_old_baselines() -> None:
    assert "archive_encrypt_vs_aesgcm" not in TARGETS
    assert "get_active_key_vs_echo" not in TARGETS
    assert TARGETS["archive_encrypt_vs_age"] == (">=", 1.0)
    assert TARGETS["get_active_key_cpu_vs_openbao"] == ("<=", 2.0)
