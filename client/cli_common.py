"""What kmsctl, kms-backup and kms-restore share besides the client.

One exit-code table, one top-level wrapper (`run_main`) that turns every failure
into one line on stderr (JSON with `--json`), argument types that name what is
wrong, bounded reads of small files, `--version` and shell completion.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import traceback
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from client.completion import SHELLS, completion_script
from client.kms_client import ConfigError, KmsError

EXIT_OK = 0
EXIT_FAILURE = 1  # the server refused, the archive failed verification, a file could not be written
EXIT_USAGE = 2  # a usage or configuration error (argparse uses 2 as well)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (`| head -1`)

MAX_REASON_LENGTH = 1024
# Characters a reason may not hold: controls (tab included), format characters (bidi
# overrides, zero-width), line and paragraph separators. They forge or hide audit lines.
FORBIDDEN_TEXT_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
ISSUES_HINT = "please report it as a bug, with the command you ran"


class CliError(Exception):
    """Ends the program: one message, an exit code and, for --json, a code and reason."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int = EXIT_FAILURE,
        code: str = "FAILED",
        reason: str = "",
        json_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # A server error's JSON carries code and reason apart, so its message is the words only.
        self.json_message = message if json_message is None else json_message
        self.exit_code = exit_code
        self.code = code
        self.reason = reason


class UsageError(CliError):
    """A bad argument, environment variable or file given as a setting: exit 2."""

    def __init__(self, message: str, *, reason: str = "ARGUMENT_INVALID", usage: str = "") -> None:
        super().__init__(message, exit_code=EXIT_USAGE, code="USAGE", reason=reason)
        self.usage = usage


class CliParser(argparse.ArgumentParser):
    """argparse, but a usage error is raised (so it can be JSON) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, usage=self.format_usage())


def version_text(prog: str) -> str:
    from importlib import metadata  # only for --version: importing and reading it is slow

    try:
        version = metadata.version("backup-kms")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = "unknown"
    return f"{prog} (backup-kms) {version}"


class _VersionAction(argparse.Action):
    """argparse's "version" action, with the text looked up only when it is asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, prog: str = "") -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                         nargs=0, help="show program's version number and exit")  # fmt: skip
        self._prog = prog

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(version_text(self._prog))
        parser.exit()


def add_version(parser: argparse.ArgumentParser, prog: str) -> None:
    parser.add_argument("--version", action=_VersionAction, prog=prog)


# -- argument types: each names what it expects; argparse adds the argument's name --------


def whole_number(minimum: int, maximum: int) -> Callable[[str], int]:
    """ASCII digits only (int() would take '٣' or '²'), within [minimum, maximum]."""

    def parse(text: str) -> int:
        digits = text[1:] if text.startswith("-") else text
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 20:
            raise argparse.ArgumentTypeError(
                f"must be a whole number from {minimum} to {maximum}, not {printable(text)}"
            )
        value = int(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"must be a whole number from {minimum} to {maximum}, not {value}"
            )
        return value

    return parse


def utf8_text(text: str) -> str:
    """Arguments that are not UTF-8 arrive with surrogate escapes; refuse them by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"is not valid UTF-8: {printable(text)}") from None
    return text


def reason_text(text: str) -> str:
    utf8_text(text)
    if len(text) > MAX_REASON_LENGTH:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_REASON_LENGTH} characters")
    bad = next((c for c in text if unicodedata.category(c) in FORBIDDEN_TEXT_CATEGORIES), None)
    if bad is not None:
        raise argparse.ArgumentTypeError(
            f"must not contain control, format or separator characters (found U+{ord(bad):04X})"
        )
    return text


def printable(text: str, limit: int = 80) -> str:
    """`text` safe to show on one terminal line: anything that could spoof it is escaped.

    Backslashes are doubled so an escape in the output always means an escaped character.
    """
    out: list[str] = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable() and unicodedata.category(char) not in FORBIDDEN_TEXT_CATEGORIES:
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    shown = "".join(out)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


# -- output ---------------------------------------------------------------------------------


def emit_json(document: object) -> None:
    print(json.dumps(document, indent=2, ensure_ascii=False))


def describe_kms_error(error: KmsError) -> str:
    """Code name, reason and the server's words: what a human needs, nothing secret."""
    reason = f" {error.reason}" if error.reason else ""
    return f"{error.code.name}{reason}: {printable(error.message, limit=2000)}"


HINTS: dict[str, str] = {
    "NO_ACTIVE_VERSION": "make a version active: kmsctl rotate {key} VERSION "
    "(kmsctl versions {key} lists them)",
    "ACTIVATE_ONLY_FIRST_VERSION": "register without --activate, then: kmsctl rotate {key} VERSION",
    "ACTIVE_VERSION_CHANGED": "see the active version with: kmsctl versions {key}",
    "KEY_NOT_FOUND": "kmsctl keys lists the keys; kmsctl register {key} --activate creates one",
    "KEY_VERSION_NOT_FOUND": "kmsctl versions {key} lists its versions",
    "KEY_VERSION_DISABLED": "enable it with: kmsctl enable {key} VERSION",
    "KEY_VERSION_ACTIVE": "make another version active first: kmsctl rotate {key} VERSION",
    "KEY_VERSION_DESTROY_SCHEDULED": "kmsctl cancel-destroy {key} VERSION cancels it until due",
    "CREDENTIALS_MISSING": "give a token: --token-file FILE or KMS_TOKEN_FILE",
    "CREDENTIALS_INVALID": "the token is not in the server's policy file; check --token-file",
}
# For failures without a reason of the server's own (the connection never got that far).
CODE_HINTS: dict[str, str] = {
    "UNAVAILABLE": "is kms-server running at that address (--addr / KMS_ADDR)? "
    "If it serves TLS, give --ca FILE",
}


def command_hint(error: KmsError, args: argparse.Namespace | None) -> str:
    """A next step in commands, chosen by the error's reason (never by its text)."""
    template = HINTS.get(error.reason) or CODE_HINTS.get(error.code.name)
    if template is None:
        return ""
    key = getattr(args, "key_name", None) or getattr(args, "key", None) or "KEY"
    return template.format(key=printable(str(key), 40))


def print_error(prog: str, message: str) -> int:
    """Print `prog: error: message` to stderr; returns the failure exit code."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_FAILURE


def _report(prog: str, error: CliError, as_json: bool) -> int:
    if as_json:
        document = {
            "code": error.code,
            "reason": error.reason,
            "message": error.json_message,
            "exit_code": error.exit_code,
        }
        print(json.dumps(document, ensure_ascii=False), file=sys.stderr)
    else:
        if isinstance(error, UsageError) and error.usage:
            print(error.usage, end="", file=sys.stderr)
        print(f"{prog}: error: {error.message}", file=sys.stderr)
    return error.exit_code


def _quiet_stdout() -> None:
    # Later writes (and the interpreter's final flush) go nowhere instead of failing again.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" at {Path(last.filename).name}:{last.lineno}"


def run_main(
    prog: str,
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    *,
    hint: Callable[[KmsError, argparse.Namespace | None], str] | None = None,
) -> int:
    """Parse, run and map every outcome onto the exit-code table; never a traceback."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Known before parsing, so a usage error is JSON too.
    as_json = "--json" in arguments
    args: argparse.Namespace | None = None
    try:
        try:
            if arguments[:1] == ["completion"]:
                return _completion(prog, build_parser(), arguments[1:])
            args = build_parser().parse_args(arguments)
            status = run(args)
            sys.stdout.flush()
            return status
        except ConfigError as error:
            raise UsageError(str(error), reason="SETTING_INVALID") from None
        except KmsError as error:
            message = describe_kms_error(error)
            extra = hint(error, args) if hint is not None else ""
            tail = f"; {extra}" if extra else ""
            raise CliError(
                f"{message}{tail}",
                code=error.code.name,
                reason=error.reason,
                json_message=f"{printable(error.message, limit=2000)}{tail}",
            ) from None
        except BrokenPipeError:
            raise
        except OSError as error:
            if error.errno == errno.EPIPE:
                raise BrokenPipeError(*error.args) from None
            where = f"{error.filename}: " if error.filename else ""
            raise CliError(f"{where}{error.strerror or error}", code="OS_ERROR") from None
        except EOFError:
            raise CliError("standard input ended before an answer", code="FAILED") from None
    except CliError as error:
        return _report(prog, error, as_json)
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return _report(
            prog,
            CliError("interrupted", exit_code=EXIT_INTERRUPTED, code="INTERRUPTED"),
            as_json,
        )
    except Exception as error:  # the last line of defence: one line, never a traceback
        # The exception's text is not shown: it could quote something secret.
        unexpected = CliError(
            f"unexpected internal error ({type(error).__name__}{_where(error)}); {ISSUES_HINT}",
            code="INTERNAL",
        )
        return _report(prog, unexpected, as_json)


def _completion(prog: str, parser: argparse.ArgumentParser, rest: list[str]) -> int:
    if len(rest) != 1 or rest[0] not in SHELLS:
        raise UsageError(
            f"completion: give one shell, {' or '.join(SHELLS)}: {prog} completion bash",
            usage=f"usage: {prog} completion {{{','.join(SHELLS)}}}\n",
        )
    sys.stdout.write(completion_script(prog, parser, rest[0]))
    sys.stdout.flush()
    return EXIT_OK


def common_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Options accepted before and after a subcommand are SUPPRESSed in both places; this
    fills in the ones given in neither."""
    for name, value in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, value)


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
