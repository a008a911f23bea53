"""The machinery the client programs share: argument types, escaping, JSON, exit codes."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client import cli_common, kmsctl
from client.cli_common import CliError, printable, reason_text, run_main, whole_number
from client.kms_client import ConfigError, check_address, config_from_args
from kms.v1 import kms_pb2
from tests.conftest import REPO, child_environment


@pytest.mark.parametrize("text", ["1", "7", "2147483647"])
def test_whole_numbers_in_range_are_accepted(text: str) -> None:
    assert whole_number(1, 2**31 - 1)(text) == int(text)


@pytest.mark.parametrize(
    "text", ["0", "2147483648", "99999999999999999999", "\u0663", "\u00b2", "1.0", "", "+1", " 1"]
)
def test_whole_numbers_refuse_range_and_non_ascii_digits(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="whole number from 1 to"):
        whole_number(1, 2**31 - 1)(text)


@pytest.mark.parametrize("text", ["a\tb", "x\u202ey", "zero\u200bwidth", "l\u2028s", "\x1b[2J"])
def test_reasons_refuse_what_could_forge_an_audit_line(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="U\\+"):
        reason_text(text)


def test_printable_escapes_everything_that_could_spoof_a_table() -> None:
    assert printable("plain name") == "plain name"
    assert printable("a\tb\nc") == "a\\x09b\\x0ac"
    assert printable("evil\u202eenil") == "evil\\u202eenil"
    assert printable("back\\slash") == "back\\\\slash"  # an escape always means one
    assert printable("x" * 129, limit=40) == "x" * 39 + "…"
    assert printable(os.fsdecode(b"\xff")) == "\\udcff"


def test_json_output_writes_64_bit_integers_as_numbers() -> None:
    event = kms_pb2.AuditEvent(sequence=2**40, version=3, action="key.rotate")
    document = kmsctl.to_json(event)
    assert document["sequence"] == 2**40 and isinstance(document["sequence"], int)
    response = kms_pb2.VerifyAuditLogResponse(intact=True, events_checked=12)
    assert kmsctl.to_json(response)["events_checked"] == 12


def test_connection_settings_name_the_variable_they_came_from() -> None:
    empty = argparse.Namespace()
    with pytest.raises(ConfigError, match="KMS_TIMEOUT"):
        config_from_args(empty, {"KMS_TIMEOUT": "abc"})
    with pytest.raises(ConfigError, match="--timeout"):
        config_from_args(argparse.Namespace(timeout="inf"), {"KMS_TIMEOUT": "5"})
    with pytest.raises(ConfigError, match="KMS_RETRIES"):
        config_from_args(empty, {"KMS_RETRIES": "11"})
    with pytest.raises(ConfigError, match="KMS_TOKEN"):
        config_from_args(empty, {"KMS_TOKEN": "two words"})
    config = config_from_args(argparse.Namespace(retries="0"), {"KMS_TIMEOUT": "2.5"})
    assert (config.timeout, config.retries, config.addr) == (2.5, 0, "127.0.0.1:50051")


@pytest.mark.parametrize(
    "addr", ["127.0.0.1:50051", "[::1]:1", "kms.internal:443", "dns:///kms:50051", "unix:/s"]
)
def test_addresses_that_grpc_understands_pass(addr: str) -> None:
    assert check_address(addr) == addr


@pytest.mark.parametrize("addr", ["127.0.0.1:99999", "127.0.0.1:0", "host", ":50051", "a b:1"])
def test_addresses_out_of_range_or_malformed_are_refused(addr: str) -> None:
    with pytest.raises(ConfigError, match="--addr"):
        check_address(addr)


def _parser() -> argparse.ArgumentParser:
    return cli_common.CliParser(prog="demo")


def test_run_main_maps_outcomes_onto_the_exit_code_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refuse(args: argparse.Namespace) -> int:
        raise CliError("the archive failed verification", code="FAILED")

    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    def broken(args: argparse.Namespace) -> int:
        raise ZeroDivisionError("secret-looking text")

    assert run_main("demo", _parser, lambda args: 0, []) == cli_common.EXIT_OK
    assert run_main("demo", _parser, refuse, []) == cli_common.EXIT_FAILURE
    assert run_main("demo", _parser, lambda args: 0, ["--nope"]) == cli_common.EXIT_USAGE
    assert run_main("demo", _parser, interrupted, []) == cli_common.EXIT_INTERRUPTED
    assert run_main("demo", _parser, broken, []) == cli_common.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "unexpected internal error (ZeroDivisionError" in err and "report" in err
    assert "secret-looking text" not in err
    assert "Traceback" not in err


def test_json_errors_have_code_reason_message(capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(args: argparse.Namespace) -> int:
        raise CliError("no", code="NOT_FOUND", reason="KEY_NOT_FOUND")

    def parser() -> argparse.ArgumentParser:
        built = cli_common.CliParser(prog="demo")
        built.add_argument("--json", action="store_true")
        return built

    assert run_main("demo", parser, refuse, ["--json"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert json.loads(err) == {
        "code": "NOT_FOUND",
        "reason": "KEY_NOT_FOUND",
        "message": "no",
        "exit_code": 1,
    }


def test_a_closed_stdout_ends_the_program_quietly() -> None:
    script = (
        "import sys\n"
        "from client.cli_common import CliParser, run_main\n"
        "def flood(args):\n"
        "    for _ in range(100000):\n"
        "        print('x' * 100)\n"
        "    return 0\n"
        "sys.exit(run_main('demo', lambda: CliParser(prog='demo'), flood, []))\n"
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=child_environment(),
    )
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.read(10)
    reader.stdout.close()  # like `| head -c 10`
    err = reader.stderr.read()
    assert reader.wait(timeout=60) == cli_common.EXIT_BROKEN_PIPE
    assert err == b""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_offers_subcommands_and_their_options(tmp_path: Path) -> None:
    script = tmp_path / "kmsctl.bash"
    script.write_text(
        subprocess.run(
            [sys.executable, "-m", "client.kmsctl", "completion", "bash"],
            capture_output=True,
            check=True,
            cwd=REPO,
            env=child_environment(),
        ).stdout.decode()
    )

    def complete(*words: str) -> set[str]:
        line = " ".join(["kmsctl", *words])
        probe = (
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; "
            '_kmsctl_complete; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        done = subprocess.run(["bash", "-c", probe], capture_output=True, check=True)
        return set(done.stdout.decode().split())

    assert {"rotate", "audit", "keys", "completion"} <= complete("")
    assert {"list", "verify"} <= complete("audit", "")
    assert {"--since", "--limit", "--action"} <= complete("audit", "list", "--")
    assert "--expect" in complete("rotate", "--")
    assert "--expect" not in complete("keys", "--")
