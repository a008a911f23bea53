"""kms-backup: encrypt files, directory trees or stdin into an archive (docs/archive-format.md).

    kms-backup create --key KEY SOURCE... -o ARCHIVE [--compression none|zstd[:LEVEL]]
                      [--exclude PATTERN]... [--special-files] [--force] [--json] [--quiet]

SOURCE `-` reads stdin; `-o -` writes the archive to stdout (the summary then
goes to stderr). An archive file appears at its path only once complete.
Exit status: 0 done, 1 the operation failed, 2 usage or configuration error,
130 interrupted (no partial archive is left behind).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from client.archive import (
    DATA_KEY_SIZE,
    ArchiveHeader,
    ArchiveWriter,
    Compression,
    PayloadKind,
    parse_compression,
)
from client.archive.tree import Scanner, data_size
from client.archive_cli import (
    EXIT_INTERRUPTED,
    FdWriter,
    Interrupted,
    Progress,
    atomic_file,
    install_signal_handlers,
    silence_stdout,
)
from client.cli_common import (
    EXIT_OK,
    CliError,
    CliParser,
    UsageError,
    add_version,
    command_hint,
    common_defaults,
    run_main,
    utf8_text,
)
from client.kms_client import KmsClient, add_connection_args, config_from_args

PROG = "kms-backup"
STDIO = "-"


@dataclass(frozen=True)
class BackupResult:
    backup_id: str
    key_name: str
    key_version: int
    payload_kind: PayloadKind
    plaintext_bytes: int
    stored_bytes: int
    compression: str
    segments: int
    archive: str

    @property
    def ratio(self) -> float:
        return round(self.stored_bytes / self.plaintext_bytes, 3) if self.plaintext_bytes else 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog=PROG,
        description="Create encrypted backup archives.",
        epilog="exit status: 0 done, 1 the operation failed, 2 usage or configuration error, "
        "130 interrupted",
    )
    add_version(parser, PROG)
    # Connection options and --json may come before or after the subcommand.
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON")
    add_connection_args(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="back up files, directory trees or stdin")
    create.add_argument(
        "--key", required=True, type=utf8_text, help="name of the key to encrypt under"
    )
    create.add_argument(
        "sources", nargs="+", metavar="SOURCE",
        help="file or directory (a symlink given here is followed), or - for stdin; several "
        "SOURCEs make one tree holding each under its own name",
    )  # fmt: skip
    create.add_argument("-o", "--output", required=True, help="archive path, or - for stdout")
    create.add_argument(
        "--compression", default="zstd", metavar="none|zstd[:LEVEL]",
        help="zstd per segment (default zstd, level 3); a segment that does not shrink is "
        "stored as is",
    )  # fmt: skip
    create.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="leave out entries matching PATTERN (shell wildcards; without a / it matches the "
        "name at any depth, with one the path below SOURCE); repeatable",
    )  # fmt: skip
    create.add_argument(
        "--special-files", action="store_true",
        help="include FIFOs and device nodes (skipped with a warning otherwise)",
    )  # fmt: skip
    create.add_argument("--force", action="store_true", help="overwrite an existing archive")
    create.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the summary as JSON"
    )
    create.add_argument(
        "-q", "--quiet", action="store_true", help="no progress line and no summary"
    )
    add_connection_args(create)
    return parser


@dataclass(frozen=True)
class Plan:
    kind: PayloadKind
    sources: list[str]
    target: Path | None
    total: int | None  # bytes to read, when known up front (for the progress line)


def plan_backup(sources: list[str], output: str, *, force: bool) -> Plan:
    """Check the arguments against the filesystem before anything is asked of the server."""
    if STDIO in sources:
        if len(sources) > 1:
            raise UsageError("- (stdin) must be the only SOURCE")
        kind, total = PayloadKind.STREAM, None
    else:
        infos = []
        for source in sources:
            try:
                info = os.stat(source)  # follows a symlink given on the command line
            except FileNotFoundError:
                raise UsageError(f"source {source} does not exist") from None
            except OSError as exc:
                raise UsageError(f"source {source}: {exc.strerror}") from None
            if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
                raise UsageError(f"source {source} is neither a regular file nor a directory")
            infos.append(info)
        names = [_top_name(s) for s in sources]
        if len(set(names)) != len(names):
            raise UsageError("two SOURCEs have the same name; each becomes a top-level entry")
        if len(sources) == 1 and stat.S_ISREG(infos[0].st_mode):
            kind, total = PayloadKind.FILE, infos[0].st_size
        else:
            kind, total = PayloadKind.TREE, None
    target = None if output == STDIO else Path(output)
    if target is not None:
        _check_output(target, sources, force=force)
    return Plan(kind, sources, target, total)


def _top_name(source: str) -> str:
    name = os.path.basename(os.path.normpath(os.path.abspath(source)))
    return name or "root"


def _check_output(target: Path, sources: list[str], *, force: bool) -> None:
    real = os.path.realpath(target)
    for source in sources:
        if source != STDIO and os.path.realpath(source) == real:
            raise UsageError(f"the output {target} is the source {source}")
    if target.is_dir() and not target.is_symlink():
        raise UsageError(f"the output {target} is a directory")
    if not force and (target.exists() or target.is_symlink()):
        raise FileExistsError(f"{target} already exists (use --force to overwrite)")
    if not target.parent.is_dir():
        raise UsageError(f"directory {target.parent} does not exist")


class _CountingSink:
    """Passes payload to the writer and advances the progress line."""

    def __init__(self, writer: ArchiveWriter, progress: Progress) -> None:
        self._writer = writer
        self._progress = progress

    def write(self, data: bytes | bytearray | memoryview) -> int:
        count = self._writer.write(data)
        self._progress.advance(count)
        return count

    def readfrom(self, source: object, limit: int = -1) -> int:
        count = self._writer.readfrom(source, limit)  # type: ignore[arg-type]
        self._progress.advance(count)
        return count


def write_payload(
    plan: Plan,
    writer: ArchiveWriter,
    progress: Progress,
    *,
    excludes: list[str],
    special_files: bool,
    skip: set[tuple[int, int]],
) -> None:
    """Stream the sources into the archive: memory stays at a few segments."""
    sink = _CountingSink(writer, progress)
    if plan.kind is PayloadKind.STREAM:
        sink.readfrom(sys.stdin.buffer)
        return
    scanner = Scanner(sink, special_files=special_files, excludes=excludes, skip=skip)
    if plan.kind is PayloadKind.FILE:
        scanner.add_file(plan.sources[0], _top_name(plan.sources[0]), follow=True)
    elif len(plan.sources) == 1:
        scanner.add_tree(plan.sources[0], "")
    else:
        for source in plan.sources:
            if os.path.isdir(source):
                scanner.add_tree(source, _top_name(source))
            else:
                scanner.add_file(source, _top_name(source), follow=True)
    scanner.end()


def create_archive(
    client: KmsClient,
    key_name: str,
    plan: Plan,
    output: str,
    *,
    compression: tuple[Compression, int] = (Compression.ZSTD, 3),
    force: bool = False,
    excludes: list[str] | None = None,
    special_files: bool = False,
    quiet: bool = False,
) -> BackupResult:
    backup_id = str(uuid.uuid4())
    issued = client.get_active_key(key_name, backup_id)
    if len(issued.data_key) != DATA_KEY_SIZE or issued.version < 1:
        raise ValueError("the server issued an unusable data key (wrong length or no version)")
    if issued.backup_id and issued.backup_id != backup_id:
        raise ValueError(f"the server issued a data key for another backup ({issued.backup_id})")
    header = ArchiveHeader(
        backup_id=backup_id,
        key_name=issued.key_name or key_name,
        key_version=issued.version,
        wrapped_data_key=issued.wrapped_data_key,
        payload_kind=plan.kind,
        compression=compression[0],
        compression_level=compression[1],
    )
    progress = Progress(plan.total, enabled=not quiet)
    if progress.enabled and plan.kind is PayloadKind.TREE:
        # One quick walk for the ETA, only when a terminal shows the progress line.
        total = 0
        for source in plan.sources:
            if os.path.isdir(source):
                total += data_size(source, excludes or [])
            else:
                total += os.stat(source).st_size
        progress.total = total or None
    options = {"excludes": excludes or [], "special_files": special_files}
    try:
        if plan.target is None:
            with ArchiveWriter(sys.stdout.buffer, header, issued.data_key) as writer:
                write_payload(plan, writer, progress, skip=set(), **options)  # type: ignore[arg-type]
            sys.stdout.buffer.flush()
        else:
            skip = set()
            if plan.target.exists():
                old = plan.target.stat()
                skip.add((old.st_dev, old.st_ino))  # the archive this one replaces
            with atomic_file(plan.target, ".partial") as out:
                held = os.fstat(out.fd)
                skip.add((held.st_dev, held.st_ino))  # the archive being written
                with ArchiveWriter(FdWriter(out.fd), header, issued.data_key) as writer:
                    write_payload(plan, writer, progress, skip=skip, **options)  # type: ignore[arg-type]
                out.commit(replace=force)
    finally:
        progress.close()
    return BackupResult(
        backup_id=backup_id,
        key_name=header.key_name,
        key_version=header.key_version,
        payload_kind=plan.kind,
        plaintext_bytes=writer.plaintext_bytes,
        stored_bytes=writer.stored_bytes,
        compression=header.compression_label,
        segments=writer.segments_written,
        archive=output,
    )


def print_summary(result: BackupResult, *, as_json: bool, to_stderr: bool) -> None:
    out = sys.stderr if to_stderr else sys.stdout
    if as_json:
        summary = {
            "backup_id": result.backup_id,
            "key": result.key_name,
            "key_version": result.key_version,
            "payload": result.payload_kind.name.lower(),
            "bytes": result.plaintext_bytes,
            "archive_bytes": result.stored_bytes,
            "ratio": result.ratio,
            "compression": result.compression,
            "segments": result.segments,
            "archive": result.archive,
        }
        print(json.dumps(summary), file=out)
    else:
        print(
            f"backup {result.backup_id}: key {result.key_name} version {result.key_version}, "
            f"{result.payload_kind.name.lower()} of {result.plaintext_bytes} bytes "
            f"-> {result.archive if result.archive != STDIO else 'stdout'} "
            f"({result.stored_bytes} bytes, ratio {result.ratio:.3f}, {result.compression})",
            file=out,
        )


def run(args: argparse.Namespace) -> int:
    """The exit-code table is cli_common's (run_main); this maps what only a backup meets."""
    common_defaults(args, {"json": False})
    try:
        compression = parse_compression(args.compression)
        plan = plan_backup(args.sources, args.output, force=args.force)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except FileExistsError as exc:  # not a usage error: the operation was refused
        raise CliError(str(exc), reason="OUTPUT_EXISTS") from None
    try:
        with KmsClient(config_from_args(args)) as client:
            result = create_archive(
                client, args.key, plan, args.output, compression=compression, force=args.force,
                excludes=args.exclude, special_files=args.special_files, quiet=args.quiet,
            )  # fmt: skip
    except Interrupted as exc:
        raise CliError(
            f"interrupted ({exc}); no archive written",
            exit_code=EXIT_INTERRUPTED,
            code="INTERRUPTED",
        ) from None
    except KeyboardInterrupt:
        raise CliError(
            "interrupted; no archive written", exit_code=EXIT_INTERRUPTED, code="INTERRUPTED"
        ) from None
    except BrokenPipeError:
        # Not the quiet stop of a listing: the archive reader got an incomplete archive.
        silence_stdout()
        raise CliError("standard output was closed before the archive was complete") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not args.quiet or args.json:
        print_summary(result, as_json=args.json, to_stderr=args.output == STDIO)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # handlers are process-wide: only when running as the program
        install_signal_handlers()
    return run_main(PROG, build_parser, run, argv, hint=command_hint)


if __name__ == "__main__":
    sys.exit(main())
