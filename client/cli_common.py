"""What kmsctl, kms-backup and kms-restore share besides the client: error output, exit codes."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from client.kms_client import KmsError

EXIT_OK = 0
EXIT_FAILURE = 1  # the server refused, the archive is bad, a file could not be written...
EXIT_USAGE = 2  # argparse uses 2 as well


def print_error(prog: str, message: str) -> int:
    """Print `prog: error: message` to stderr; returns the failure exit code."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_FAILURE


def describe_kms_error(error: KmsError) -> str:
    """Code name, reason and the server's words: what a human needs, nothing secret."""
    reason = f" {error.reason}" if error.reason else ""
    return f"{error.code.name}{reason}: {error.message}"


def remove_quietly(path: Path) -> None:
    """Delete a temporary file we created; it may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def fsync_directory(path: Path) -> None:
    """Make a rename durable; not every platform can open a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
