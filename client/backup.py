"""kms-backup: encrypt a file, a directory tree or stdin into an archive (docs/archive-format.md).

    kms-backup create --key KEY SOURCE -o ARCHIVE [--json]

SOURCE `-` reads stdin; `-o -` writes the archive to stdout (the summary then
goes to stderr). A file archive is written beside its target and renamed
into place only once complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from client.archive import (
    DATA_KEY_SIZE,
    DEFAULT_SEGMENT_SIZE,
    ArchiveHeader,
    ArchiveWriter,
    PayloadKind,
    Writable,
    copy_into,
)
from client.cli_common import (
    EXIT_OK,
    CliError,
    CliParser,
    add_version,
    command_hint,
    common_defaults,
    fsync_directory,
    remove_quietly,
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
    segments: int
    archive: str


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog=PROG, description="Create encrypted backup archives.")
    add_version(parser, PROG)
    # Connection options and --json may come before or after the subcommand.
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON")
    add_connection_args(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="back up a file, a directory tree or stdin")
    create.add_argument(
        "--key", required=True, type=utf8_text, help="name of the key to encrypt under"
    )
    create.add_argument("source", help="file, directory, or - for stdin")
    create.add_argument("-o", "--output", required=True, help="archive path, or - for stdout")
    create.add_argument("--force", action="store_true", help="overwrite an existing archive")
    create.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the summary as JSON"
    )
    add_connection_args(create)
    return parser


def source_kind(source: str) -> PayloadKind:
    if source == STDIO:
        return PayloadKind.STREAM
    path = Path(source)
    if path.is_dir():
        return PayloadKind.TREE
    if path.is_file():
        return PayloadKind.FILE
    if not path.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    raise ValueError(f"source {source} is neither a regular file nor a directory")


def write_payload(source: str, kind: PayloadKind, writer: ArchiveWriter) -> None:
    """Stream the source into the archive: memory stays at a couple of segments."""
    chunk = DEFAULT_SEGMENT_SIZE
    if kind is PayloadKind.STREAM:
        copy_into(sys.stdin.buffer, writer, chunk)
    elif kind is PayloadKind.FILE:
        # Unbuffered: the writer reads straight into its segment buffers.
        with open(source, "rb", buffering=0) as file:
            copy_into(file, writer, chunk)
    else:
        import tarfile  # only trees need it (a measurable part of start-up otherwise)

        # Stream mode never seeks, so the tar goes straight into the encrypting writer.
        # A write-only file object is all that "w|" uses, though typeshed asks for more.
        with tarfile.open(  # type: ignore[call-overload]
            fileobj=writer,
            mode="w|",
            format=tarfile.PAX_FORMAT,
        ) as tar:
            tar.add(source, arcname=".", recursive=True)


def create_archive(
    client: KmsClient, key_name: str, source: str, output: str, *, force: bool = False
) -> BackupResult:
    kind = source_kind(source)
    target = None if output == STDIO else Path(output)
    if target is not None and not force and (target.exists() or target.is_symlink()):
        raise FileExistsError(f"{output} already exists (use --force to overwrite)")
    if target is not None and not target.parent.is_dir():
        raise FileNotFoundError(f"directory {target.parent} does not exist")

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
        payload_kind=kind,
    )

    def seal_into(dest: Writable) -> ArchiveWriter:
        with ArchiveWriter(dest, header, issued.data_key) as writer:
            write_payload(source, kind, writer)
        return writer

    if target is None:
        writer = seal_into(sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        # Written beside the target so the final rename stays on one filesystem.
        partial: Path | None = None
        try:
            with tempfile.NamedTemporaryFile(
                dir=target.parent, prefix=f".{target.name}.", suffix=".partial", delete=False
            ) as handle:
                partial = Path(handle.name)
                writer = seal_into(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        except BaseException:
            if partial is not None:
                remove_quietly(partial)
            raise
        fsync_directory(target.parent)
    return BackupResult(
        backup_id=backup_id,
        key_name=header.key_name,
        key_version=header.key_version,
        payload_kind=kind,
        plaintext_bytes=writer.plaintext_bytes,
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
            "segments": result.segments,
            "archive": result.archive,
        }
        print(json.dumps(summary), file=out)
    else:
        print(
            f"backup {result.backup_id}: key {result.key_name} version {result.key_version}, "
            f"{result.payload_kind.name.lower()} of {result.plaintext_bytes} bytes "
            f"-> {result.archive if result.archive != STDIO else 'stdout'}",
            file=out,
        )


def _is_tar_error(exc: BaseException) -> bool:
    """A tarfile error, without importing tarfile for backups that never used it."""
    tarfile = sys.modules.get("tarfile")
    return tarfile is not None and isinstance(exc, tarfile.TarError)


def run(args: argparse.Namespace) -> int:
    common_defaults(args, {"json": False})
    try:
        with KmsClient(config_from_args(args)) as client:
            result = create_archive(client, args.key, args.source, args.output, force=args.force)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:
        if not _is_tar_error(exc):
            raise
        raise CliError(f"cannot archive the tree: {exc}") from None
    print_summary(result, as_json=args.json, to_stderr=args.output == STDIO)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, build_parser, run, argv, hint=command_hint)


if __name__ == "__main__":
    sys.exit(main())
