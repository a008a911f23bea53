"""Helpers for driving the client programs in-process against the real `kms` fixture."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def no_kms_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The programs read KMS_* defaults; a developer's shell must not leak into the tests."""
    for name in ("KMS_ADDR", "KMS_TOKEN", "KMS_TOKEN_FILE", "KMS_CA", "KMS_CERT", "KMS_KEY"):
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stdout: str
    stderr: str


def run_program(main: Callable[[list[str]], int], argv: list[str]) -> Outcome:
    """Run a program's main() in this process, capturing what it prints."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    return Outcome(code, out.getvalue(), err.getvalue())


def write_random_file(path: Path, size: int, chunk: int = 1 << 20) -> None:
    """Stream random bytes to disk: memory stays at one chunk however large the file."""
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            piece = min(chunk, remaining)
            out.write(os.urandom(piece))
            remaining -= piece


@contextlib.contextmanager
def nothing_new_in(directory: Path) -> Iterator[None]:
    """Assert a failing operation leaves no file behind (no target, no temporary)."""
    before = set(os.listdir(directory)) if directory.exists() else set()
    yield
    after = set(os.listdir(directory)) if directory.exists() else set()
    assert after == before, f"left behind: {sorted(after - before)}"
