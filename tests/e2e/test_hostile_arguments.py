"""Every program and subcommand, run as a user would, with hostile values for its arguments.

Each run must end without a traceback, with the documented exit code (docs/cli.md: 2 for a
usage or configuration error, 1 for a failed operation) and a message naming the argument.
The clients point at a closed port: whatever passes their own checks fails there with 1.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, child_environment

MODULES = {
    "kmsctl": "client.kmsctl",
    "kms-backup": "client.backup",
    "kms-restore": "client.restore",
    "kms-server": "server.main",
}
NOT_UTF8 = b"\xff\xfe"
BIG = "99999999999999999999"
ARABIC_INDIC_THREE = "\u0663"


@dataclass(frozen=True)
class Case:
    program: str
    argv: tuple[str | bytes, ...]
    names: str  # what the message must mention
    exit_code: int = 2
    env: dict[str, str | bytes] = field(default_factory=dict)
    # Run as a separate process; the rest of the client cases run in this one (main(argv)),
    # which is the same code without hundreds of interpreter starts.
    process: bool = False

    @property
    def in_process(self) -> bool:
        return not self.process

    def __str__(self) -> str:
        shown = " ".join(a if isinstance(a, str) else repr(a) for a in self.argv)
        return f"{self.program} {shown} {self.env or ''}".strip()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    place = tmp_path_factory.mktemp("hostile")
    fifo = place / "fifo"
    os.mkfifo(fifo)
    (place / "binary").write_bytes(b"\xff\x00\xfe\n")
    (place / "two-lines").write_text("first\nsecond\n")
    (place / "short-key").write_bytes(b"x" * 31)
    (place / "plain").write_text("not an archive and not PEM\n")
    (place / "dir").mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    yield {
        "fifo": str(fifo),
        "binary": str(place / "binary"),
        "two-lines": str(place / "two-lines"),
        "short-key": str(place / "short-key"),
        "plain": str(place / "plain"),
        "dir": str(place / "dir"),
        "missing": str(place / "missing"),
        "out": str(place / "out"),
        "closed": closed,
        "place": str(place),
    }


def number_cases(program: str, before: tuple[str, ...], name: str, after: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """Hostile values for a whole-number argument."""
    for value in (BIG, "-1", ARABIC_INDIC_THREE, "1.5", NOT_UTF8):
        yield Case(program, (*before, value, *after), name)


def client_cases() -> Iterator[Case]:
    # kmsctl: every subcommand, every argument.
    for command in ("disable", "enable", "destroy"):
        yield from number_cases(
            "kmsctl", (command, "db"), "VERSION", ("--yes",) * (command == "destroy")
        )
        yield Case("kmsctl", (command, NOT_UTF8, "1"), "KEY")
        yield Case("kmsctl", (command, "db", "1", "--reason", "a\tb"), "--reason")
        yield Case("kmsctl", (command, "db", "1", "--reason", NOT_UTF8), "--reason")
    yield from number_cases("kmsctl", ("rotate", "db"), "VERSION")
    yield from number_cases("kmsctl", ("rotate", "db", "2", "--expect"), "--expect")
    yield Case("kmsctl", ("rotate", "db", "2", "--expect", "4294967296"), "--expect")
    yield Case("kmsctl", ("rotate", "db", "2", "--reason", "evil\u202eenil"), "--reason")
    yield Case("kmsctl", ("rotate", "db", "2", "--reason", "zero\u200bwidth"), "--reason")
    yield Case("kmsctl", ("rotate", "db", "2", "--reason", "x" * 1025), "--reason")
    yield Case("kmsctl", ("rotate", "db"), "VERSION")
    yield Case("kmsctl", ("register", NOT_UTF8), "KEY", process=True)
    for hostile in ("fifo", "dir", "missing", "short-key", "/dev/zero"):
        yield Case("kmsctl", ("register", "db", "--import-file", hostile), "--import-file")
    yield Case("kmsctl", ("versions", NOT_UTF8), "KEY")
    yield Case("kmsctl", ("versions",), "KEY")
    yield Case("kmsctl", ("keys", "extra"), "extra")
    yield from number_cases("kmsctl", ("audit", "list", "--limit"), "--limit")
    yield from number_cases("kmsctl", ("audit", "list", "--since"), "--since")
    yield Case("kmsctl", ("audit", "list", "--key", NOT_UTF8), "--key")
    yield Case("kmsctl", ("audit", "list", "--action", "key rotate\x1b"), "--action")
    yield Case("kmsctl", ("audit", "verify", "--bogus"), "--bogus")
    yield Case("kmsctl", ("audit",), "ACTION")
    yield Case("kmsctl", ("nosuch",), "nosuch")
    yield Case("kmsctl", (), "COMMAND")
    yield Case("kmsctl", ("completion", "fish"), "completion")
    # Things that pass kmsctl's checks fail at the closed port: exit 1, the status named.
    yield Case("kmsctl", ("keys",), "UNAVAILABLE", exit_code=1, process=True)
    yield Case("kmsctl", ("rotate", "db", "1", "--reason", "emoji \U0001f511 ok"), "UNAVAILABLE", 1)

    # kms-backup and kms-restore.
    yield Case(
        "kms-backup", ("create", "--key", NOT_UTF8, "plain", "-o", "out"), "--key", process=True
    )
    yield Case("kms-backup", ("create", "--key", "db", "plain"), "--output")
    yield Case("kms-backup", ("create", "plain", "-o", "out"), "--key")
    yield Case("kms-backup", ("nosuch",), "nosuch")
    yield Case("kms-backup", ("completion", "fish"), "completion")
    yield Case("kms-restore", ("completion",), "completion")
    yield Case("kmsctl", ("audit", "verify", "--json", "--timeout", "soon"), "--timeout")
    yield Case("kms-restore", ("plain",), "--verify")
    yield Case("kms-restore", ("plain", "--verify", "-o", "out"), "--verify")
    yield Case("kms-restore", ("plain", "--verify"), "plain", exit_code=1)
    yield Case("kms-restore", ("/dev/zero", "--verify"), "/dev/zero", exit_code=1, process=True)
    yield Case("kms-restore", ("missing", "--verify"), "missing", exit_code=1)

    # The connection options and variables, for every client program.
    for program, argv in (
        ("kmsctl", ("keys",)),
        ("kms-backup", ("create", "--key", "db", "plain", "-o", "out")),
        ("kms-restore", ("plain", "--verify")),
    ):
        for value in ("inf", "nan", "0", "abc", "1e9"):
            yield Case(program, (*argv, "--timeout", value), "--timeout")
        yield Case(program, argv, "KMS_TIMEOUT", env={"KMS_TIMEOUT": "abc"})
        yield Case(program, ("--help",), "KMS_TIMEOUT", 0, env={"KMS_TIMEOUT": "abc"}, process=True)
        for value in ("11", BIG, ARABIC_INDIC_THREE):
            yield Case(program, (*argv, "--retries", value), "--retries")
        for value in ("127.0.0.1:99999", "127.0.0.1", "", "host name:1", "127.0.0.1:0"):
            yield Case(program, (*argv, "--addr", value), "--addr")
        yield Case(program, argv, "KMS_ADDR", env={"KMS_ADDR": NOT_UTF8})
        for hostile in ("fifo", "/dev/zero", "binary", "two-lines", "missing"):
            yield Case(program, (*argv, "--token-file", hostile), "token file")
        yield Case(program, argv, "KMS_TOKEN", env={"KMS_TOKEN": "t\u00e9st"})
        yield Case(program, argv, "KMS_TOKEN_FILE", env={"KMS_TOKEN_FILE": "fifo"})
        for hostile in ("fifo", "/dev/zero", "plain"):
            yield Case(program, (*argv, "--ca", hostile), "--ca")
        yield Case(program, (*argv, "--cert", "plain"), "--cert")


def server_cases() -> Iterator[Case]:
    dev = ("--dev", "--data-dir", "place/kms")
    for flag in (
        "--processes",
        "--max-workers",
        "--db-pool-size",
        "--max-concurrent-rpcs",
        "--db-statement-timeout-ms",
        "--shutdown-grace-seconds",
    ):
        for value in (BIG, "0", ARABIC_INDIC_THREE, NOT_UTF8):
            yield Case("kms-server", (*dev, flag, value), flag)
    for flag in ("--listen", "--health-listen", "--metrics-listen"):
        for value in ("127.0.0.1:99999", "127.0.0.1", "127.0.0.1:http", NOT_UTF8):
            yield Case("kms-server", (*dev, flag, value), flag)
    yield Case("kms-server", (*dev, "--metrics-listen", ":9100"), "--metrics-allow-remote")
    yield Case("kms-server", (*dev, "--health-listen", "0.0.0.0:9000"), "--health-listen")
    yield Case("kms-server", (*dev, "--listen", "0.0.0.0:50051"), "refusing plaintext")
    for value in ("verbose", NOT_UTF8):
        yield Case("kms-server", (*dev, "--log-level", value), "--log-level")
    yield Case("kms-server", (*dev, "--log-format", "xml"), "--log-format")
    for url in ("notaurl", "mysql://db/kms", "postgresql+psycopg2://db/kms", "sqlite://"):
        yield Case("kms-server", (*dev, "--database-url", url), "--database-url")
        yield Case("kms-server", ("migrate", "--database-url", url), "--database-url")
    # These get past the settings and start logging: in a process of their own.
    yield Case("kms-server", ("--data-dir", "missing", "--insecure"), "--data-dir", process=True)
    yield Case("kms-server", ("--dev", "--data-dir", "plain"), "--data-dir", process=True)
    yield Case("kms-server", ("migrate", "--data-dir", "missing"), "--data-dir")
    yield Case("kms-server", ("--insecure",), "--data-dir")
    # Not dev mode, which would create a missing root key or policy.
    plain = ("--data-dir", "place", "--insecure")
    for hostile in ("/dev/zero", "fifo", "dir", "missing"):
        yield Case(
            "kms-server", (*plain, "--root-key-file", hostile), "--root-key-file", process=True
        )
        yield Case("kms-server", (*plain, "--policy-file", hostile), "--policy-file", process=True)
        yield Case(
            "kms-server",
            ("--data-dir", "place", "--tls-cert", hostile, "--tls-key", "plain"),
            "--tls-cert",
            process=True,
        )
    yield Case("kms-server", (*dev, "--tls-cert", "plain"), "--tls-key")
    yield Case("kms-server", (*dev, "--tls-client-ca", "plain"), "--tls-client-ca")
    yield Case("kms-server", (*dev,), "KMS_PROCESSES", env={"KMS_PROCESSES": "all"})
    yield Case("kms-server", (*dev,), "KMS_INSECURE", env={"KMS_INSECURE": "maybe"})
    yield Case("kms-server", (*dev,), "KMS_LISTEN", env={"KMS_LISTEN": "localhost:65536"})
    yield Case("kms-server", (*dev, "--bogus"), "--bogus")
    yield Case("kms-server", ("completion",), "completion")


CASES = [*client_cases(), *server_cases()]


def _resolve(value: str | bytes, files: dict[str, str]) -> str | bytes:
    if isinstance(value, bytes):
        return value
    if value in files:
        return files[value]
    if value.startswith("place"):
        return files["place"] + value.removeprefix("place")
    return value


def _run(case: Case, files: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    argv = [_resolve(a, files) for a in case.argv]
    if case.program != "kms-server" and argv[:1] != ["completion"]:
        # First, so that the case's own value (later) wins; this also runs every client with
        # options before its subcommand. A variable under test is not overridden by a flag.
        connection = {"--addr": files["closed"], "--timeout": "2", "--retries": "0"}
        overridden = {"KMS_ADDR": "--addr", "KMS_TIMEOUT": "--timeout"}
        for variable in case.env:
            connection.pop(overridden.get(variable, ""), None)
        argv = [*(x for pair in connection.items() for x in pair), *argv]
    env: dict[str | bytes, str | bytes] = dict(child_environment().items())
    env.update({k: _resolve(v, files) for k, v in case.env.items()})
    return subprocess.run(
        [sys.executable, "-m", MODULES[case.program], *argv],
        capture_output=True,
        cwd=files["place"],
        env={os.fsencode(k): os.fsencode(v) for k, v in env.items()},
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


@pytest.fixture(scope="module")
def outcomes(files: dict[str, str]) -> dict[str, subprocess.CompletedProcess[bytes]]:
    """Every case run once, a few at a time: hundreds of interpreter starts, one after the
    other, would take minutes."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = {str(case): pool.submit(_run, case, files) for case in CASES if not case.in_process}
        return {name: run.result() for name, run in runs.items()}


def _run_here(
    case: Case,
    files: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> tuple[int, bytes]:
    """main(argv) in this process, argv decoded as Python decodes a real one."""
    argv = [os.fsdecode(_resolve(a, files)) for a in case.argv]
    if case.program != "kms-server" and argv[:1] != ["completion"]:
        connection = {"--addr": files["closed"], "--timeout": "2", "--retries": "0"}
        for variable, flag in (("KMS_ADDR", "--addr"), ("KMS_TIMEOUT", "--timeout")):
            if variable in case.env:
                del connection[flag]
        argv = [*(x for pair in connection.items() for x in pair), *argv]
    for name in list(os.environ):
        if name.startswith("KMS_"):
            monkeypatch.delenv(name)
    for name, value in case.env.items():
        monkeypatch.setenv(name, os.fsdecode(_resolve(value, files)))
    monkeypatch.chdir(files["place"])
    main = importlib.import_module(MODULES[case.program]).main
    umask = os.umask(0o022)  # kms-server's main sets 077 for the whole process
    os.umask(umask)
    try:
        status = main(argv)
    except SystemExit as exit_:  # --help
        status = int(exit_.code or 0)
    finally:
        os.umask(umask)
    captured = capfdbinary.readouterr()
    return status, captured.out + captured.err


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_values_are_refused_by_name_without_a_traceback(
    case: Case,
    files: dict[str, str],
    outcomes: dict[str, subprocess.CompletedProcess[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    if case.in_process:
        returncode, output = _run_here(case, files, monkeypatch, capfdbinary)
    else:
        done = outcomes[str(case)]
        returncode, output = done.returncode, done.stdout + done.stderr
    assert b"Traceback" not in output, output.decode(errors="replace")
    assert returncode == case.exit_code, output.decode(errors="replace")
    assert case.names.encode() in output, output.decode(errors="replace")
    if case.exit_code != 0:
        # One message, not a screenful: gRPC's C-core log lines start with "E" and a date.
        assert not any(line.startswith(b"E1") for line in output.splitlines())


def test_every_case_is_distinct() -> None:
    assert len({str(case) for case in CASES}) == len(CASES)


def test_errors_are_json_on_stderr_with_json(files: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "client.kmsctl", "--json", "rotate", "db", BIG],
        capture_output=True,
        cwd=REPO,
        env=child_environment(),
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == b""
    error = json.loads(done.stderr)
    assert error["code"] == "USAGE" and error["exit_code"] == 2
    assert "VERSION" in error["message"]
    assert set(error) == {"code", "reason", "message", "exit_code"}


def test_the_closed_port_refuses_connections(files: dict[str, str]) -> None:
    # The matrix relies on it: what passes the clients' checks fails there.
    host, port = files["closed"].rsplit(":", 1)
    with socket.socket() as sock, pytest.raises(OSError):
        sock.connect((host, int(port)))
    assert Path(files["place"]).is_dir()
