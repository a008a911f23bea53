"""kms-restore: verify and decrypt an archive made by kms-backup.

    kms-restore ARCHIVE -o TARGET [--force] [--include PATH]...
    kms-restore ARCHIVE -o -            (a file or stream, to standard output)
    kms-restore --verify ARCHIVE | --list ARCHIVE | --inspect ARCHIVE

A restore to a path becomes visible only once every segment verified: a file is
written unnamed (or under a hidden name) and linked into place, a tree is built in a
hidden staging directory beside TARGET and renamed into place. To standard output,
each segment is released as soon as its tag verifies, so a consumer must check the
exit status (as with age): anything but 0 means the output is incomplete or forged.
Exit status: 0 done, 1 the operation failed (server refused, archive failed
verification), 2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import grpc

from client.archive import (
    DATA_KEY_SIZE,
    ArchiveError,
    ArchiveHeader,
    ParsedHeader,
    PayloadKind,
    PlaintextReader,
    iter_segments,
    read_header,
)
from client.archive import tree as tree_format
from client.archive_cli import (
    EXIT_INTERRUPTED,
    Interrupted,
    Progress,
    ProgressReader,
    StagingDirectory,
    atomic_file,
    install_signal_handlers,
    remove_stale_staging,
    silence_stdout,
)
from client.cli_common import (
    EXIT_OK,
    CliError,
    CliParser,
    UsageError,
    add_version,
    describe_kms_error,
    fsync_directory,
    remove_quietly,
    run_main,
)
from client.kms_client import KmsClient, KmsError, add_connection_args, config_from_args
from kms.v1 import kms_pb2

PROG = "kms-restore"
STDIO = "-"


class RestoreError(Exception):
    """Restore cannot go on; the message says why in words."""


class Listing:
    """The rows of `--list`, spooled to an unnamed temporary file as the archive is read.

    Printed only once the whole archive verified, in memory that does not grow with the
    number of entries (the file does, by one line each).
    """

    def __init__(self, *, as_json: bool) -> None:
        self._as_json = as_json
        self._encoding = sys.stdout.encoding or "utf-8"
        self._errors = sys.stdout.errors or "strict"
        # Unnamed (O_TMPFILE) where it can be: nothing to leave behind. Closed by close().
        self._file: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.count = 0

    def add(self, e: tree_format.Entry) -> None:
        if self._as_json:
            row = {"path": e.path or ".", "type": tree_format.describe_mode(e)[0],
                   "mode": oct(e.mode), "size": e.size, "mtime_ns": e.mtime_ns, "uid": e.uid,
                   "gid": e.gid, **({"link": e.link} if e.link else {})}  # fmt: skip
            line = ("" if not self.count else ", ") + json.dumps(row)
        else:
            link = {tree_format.SYMLINK: " -> ", tree_format.HARDLINK: " link to "}
            arrow = link.get(e.kind, "")
            target = _shown(e.link) if arrow else ""
            line = (
                f"{tree_format.describe_mode(e)} {e.uid:>5} {e.gid:>5} {e.size:>12} "
                f"{_time(e.mtime_ns)} {_shown(e.path) or '.'}{arrow}{target}\n"
            )
        self._file.write(line.encode(self._encoding, self._errors))
        self.count += 1

    def print(self, header: ArchiveHeader, plaintext_bytes: int) -> None:
        out = sys.stdout
        if self._as_json:
            # The same bytes as json.dumps({**summary, "entries": rows}), a row at a time.
            out.write(json.dumps(header_summary(header))[:-1] + ', "entries": [')
        elif not self.count:
            out.write(f"(a {header.payload_kind.name.lower()} of {plaintext_bytes} bytes)\n")
        out.flush()
        self._file.seek(0)
        shutil.copyfileobj(self._file, out.buffer)
        out.buffer.flush()
        if self._as_json:
            out.write("]}\n")

    def close(self) -> None:
        self._file.close()


def _shown(name: str) -> str:
    """Names that are not UTF-8 print as escapes, never fail."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class RestoreResult:
    header: ArchiveHeader
    plaintext_bytes: int
    target: str | None
    listing: Listing | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog=PROG,
        description="Verify and restore an encrypted backup archive.",
        epilog="To standard output (-o -) each segment is written as soon as it verified: "
        "check the exit status, anything but 0 means the output is incomplete or was forged "
        "and must be discarded. Exit status: 0 done, 1 the operation failed (server refused, "
        "archive failed verification), 2 usage or configuration error, 130 interrupted.",
    )
    add_version(parser, PROG)
    parser.add_argument("archive", help="archive path, or - for stdin")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "-o", "--output",
        help="where to restore; - for stdout (files and streams only, released as verified)",
    )  # fmt: skip
    mode.add_argument(
        "--verify", action="store_true", help="check the whole archive, write nothing"
    )
    mode.add_argument(
        "--list", action="store_true",
        help="print names, sizes, modes and times, once the whole archive verified",
    )  # fmt: skip
    mode.add_argument(
        "--inspect", action="store_true",
        help="print the header only (no server call, no key, nothing verified)",
    )  # fmt: skip
    parser.add_argument(
        "--include", action="append", default=[], metavar="PATH",
        help="restore only PATH (a file or directory of the tree, relative to its top); "
        "repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--special-files", action="store_true",
        help="create the FIFOs and device nodes a tree holds (skipped with a warning otherwise)",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace an existing target")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress line and no summary"
    )
    add_connection_args(parser)
    return parser


def explain_resolve_failure(error: KmsError, header: ArchiveHeader, addr: str) -> str:
    """Say in words why the backup's key could not be had; the status follows in brackets."""
    version = f"{header.key_name} version {header.key_version}"
    by_reason = {
        "KEY_VERSION_DESTROYED": f"key {version} of this backup was destroyed: "
        "the backup can never be restored",
        "KEY_VERSION_DISABLED": f"key {version} of this backup is disabled: "
        "enable it to restore this backup",
        "KEY_VERSION_DESTROY_SCHEDULED": f"key {version} of this backup is scheduled for "
        "destruction: cancel that to restore this backup",
        "BACKUP_NOT_FOUND": f"the server does not know backup {header.backup_id}",
        "KEY_NOT_FOUND": f"the server does not know key {header.key_name}",
        "RECOVERY_KEY_MISMATCH": f"the server does not know backup {header.backup_id}, and "
        "the wrapped data key in the archive header was not issued for it",
    }
    by_code = {
        grpc.StatusCode.UNAUTHENTICATED: "the server rejected the credentials",
        grpc.StatusCode.PERMISSION_DENIED: "these credentials may not resolve backup keys "
        "(the restore role is needed)",
        grpc.StatusCode.UNAVAILABLE: f"the server at {addr} is unreachable",
        grpc.StatusCode.DEADLINE_EXCEEDED: f"the server at {addr} did not answer in time",
    }
    summary = by_reason.get(error.reason) or by_code.get(error.code) or "key resolution failed"
    return f"{summary} [{describe_kms_error(error)}]"


def resolve_data_key(client: KmsClient, header: ArchiveHeader) -> bytes:
    """Ask for the backup's data key and check the server agrees with the header."""
    recovery = kms_pb2.BackupKeyReference(
        key_name=header.key_name,
        version=header.key_version,
        wrapped_data_key=header.wrapped_data_key,
    )
    try:
        resolved = client.resolve_key_for_backup(header.backup_id, recovery)
    except KmsError as exc:
        raise RestoreError(explain_resolve_failure(exc, header, client.config.addr)) from None
    # A newer version than the header's is a retired version's backup, rewrapped
    # (kmsctl retire); the archive's own authentication checks the data key either way.
    if resolved.key_name != header.key_name or resolved.version < header.key_version:
        raise RestoreError(
            f"the server binds backup {header.backup_id} to key {resolved.key_name} "
            f"version {resolved.version}, but the archive header says {header.key_name} "
            f"version {header.key_version}: refusing to restore"
        )
    if len(resolved.data_key) != DATA_KEY_SIZE:
        raise RestoreError("the server returned a data key of the wrong length")
    return resolved.data_key


@contextlib.contextmanager
def open_archive(archive: str) -> Iterator[BinaryIO]:
    if archive == STDIO:
        yield sys.stdin.buffer
        return
    try:
        stream = open(archive, "rb")  # noqa: SIM115  (closed below)
    except OSError as exc:
        # Exit 1, like any file that cannot be read: the argument is well-formed.
        raise CliError(f"cannot open archive {archive}: {exc.strerror}") from None
    with stream:
        yield stream


def check_target(target: Path, kind: PayloadKind, *, force: bool) -> None:
    """Refuse what must never be replaced, before anything is decrypted."""
    if not target.parent.is_dir():
        raise UsageError(f"directory {target.parent} does not exist")
    try:
        info = target.lstat()
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode) or stat.S_ISLNK(info.st_mode)):
        raise UsageError(f"{target} is not a regular file or directory: restore never replaces "
                         "it (use -o - to write to standard output)")  # fmt: skip
    if stat.S_ISDIR(info.st_mode) and kind is not PayloadKind.TREE:
        raise UsageError(f"{target} is a directory and the archive holds a single "
                         f"{kind.name.lower()}: give the path of the file to create")  # fmt: skip
    if not force:
        raise RestoreError(f"{target} already exists (use --force to replace it)")


def _exchange(staged: Path, target: Path) -> bool:
    """Swap the two names in one step (renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes  # only when replacing a target

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc 2.28+ or not Linux
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(staged), at_fdcwd, os.fsencode(target),
                 rename_exchange) == 0:  # fmt: skip
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or filesystem
        return False
    raise OSError(error, os.strerror(error), str(target))


def _install(staged: Path, target: Path, *, force: bool) -> None:
    """Rename the verified tree into place, replacing the old target only with --force."""
    if not (target.exists() or target.is_symlink()):
        os.rename(staged, target)
    elif not force:
        raise RestoreError(f"{target} already exists (use --force to replace it)")
    elif _exchange(staged, target):
        # The target is never missing; the old one now has the staging name, which the next
        # restore here removes should this process die before it does.
        if staged.is_dir() and not staged.is_symlink():
            tree_format.remove_tree(str(staged))
        else:
            remove_quietly(staged)
    else:
        # A directory cannot be replaced by one rename: move the old target aside first.
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, aside / "old")
        try:
            os.rename(staged, target)
        except OSError:
            os.rename(aside / "old", target)
            tree_format.remove_tree(str(aside))
            raise
        tree_format.remove_tree(str(aside))
    fsync_directory(target.parent)


def _warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _write_stdout(view: memoryview) -> None:
    fd = sys.stdout.fileno()
    while view:
        view = view[os.write(fd, view) :]


def _restore_to_stdout(reader: PlaintextReader, header: ArchiveHeader) -> None:
    sys.stdout.flush()
    if header.version == 2 and header.payload_kind is PayloadKind.FILE:
        entries = tree_format.EntryReader(reader)
        entry = _single_file(entries)
        zeros = memoryview(bytes(tree_format.COPY_CHUNK))
        position = [0]

        def emit(offset: int, view: memoryview) -> None:
            while position[0] < offset:  # a hole: zeros, as reading the file would give
                count = min(len(zeros), offset - position[0])
                _write_stdout(zeros[:count])
                position[0] += count
            _write_stdout(view)
            position[0] += len(view)

        entries.copy_data(entry, lambda offset, view: emit(offset, view))
        emit(entry.size, memoryview(b""))
        if entries.next() is not None:
            raise ArchiveError("a file archive holds more than one entry")
        return
    while view := reader.readview():
        _write_stdout(view)


def _single_file(entries: tree_format.EntryReader) -> tree_format.Entry:
    entry = entries.next()
    if entry is None or entry.kind != tree_format.FILE:
        raise ArchiveError("a file archive must hold exactly one file entry")
    return entry


def _restore_file(
    reader: PlaintextReader, header: ArchiveHeader, target: Path, force: bool
) -> None:
    with atomic_file(target, ".restoring") as out:
        if header.version == 2 and header.payload_kind is PayloadKind.FILE:
            entries = tree_format.EntryReader(reader)
            entry = _single_file(entries)
            tree_format.write_file_data(out.fd, entries, entry)
            if entries.next() is not None:
                raise ArchiveError("a file archive holds more than one entry")
            tree_format.apply_metadata(str(target), entry, fd=out.fd, warn=_warn,
                                       owner=os.geteuid() == 0)  # fmt: skip
        else:
            while view := reader.readview():
                tree_format.write_all_fd(out.fd, view)
            # Like a file written by `cat > target`, not the 0600 of a temporary file.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(out.fd, 0o666 & ~umask)
        out.commit(replace=force)


def _restore_tree(
    reader: PlaintextReader,
    header: ArchiveHeader,
    target: Path,
    force: bool,
    includes: list[str],
    special_files: bool,
) -> None:
    held = StagingDirectory(target)
    staging = held.path
    try:
        if header.version == 1:
            _extract_v1_tar(reader, staging)
        else:
            extractor = tree_format.Extractor(
                str(staging), warn=_warn, includes=includes, special_files=special_files
            )
            entries = tree_format.EntryReader(reader)
            while (entry := entries.next()) is not None:
                extractor.extract(entries, entry)
            extractor.finish()
        root_times = os.stat(staging)
        _install(staging, target, force=force)
        # Renaming a directory may touch its own times on some filesystems.
        os.utime(target, ns=(root_times.st_atime_ns, root_times.st_mtime_ns))
    except BaseException:
        tree_format.remove_tree(str(staging))
        raise
    finally:
        held.release()


def _extract_v1_tar(reader: PlaintextReader, staging: Path) -> None:
    """Version 1 trees are tars: streamed through tarfile's safe "tar" filter."""
    import tarfile

    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        tar.extractall(staging, filter="tar")
        if os.utime in os.supports_follow_symlinks:
            for member in tar.members:
                if member.issym():
                    safe = tarfile.tar_filter(member, str(staging))
                    os.utime(staging / safe.name, (safe.mtime, safe.mtime), follow_symlinks=False)


def _list(reader: PlaintextReader, header: ArchiveHeader, listing: Listing) -> None:
    if header.version == 2 and header.payload_kind is not PayloadKind.STREAM:
        for entry in tree_format.iter_entries(tree_format.EntryReader(reader)):
            listing.add(entry)
        return
    if header.version == 1 and header.payload_kind is PayloadKind.TREE:
        import tarfile

        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            while (member := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every member it read: memory would grow
                kind = (
                    tree_format.DIRECTORY
                    if member.isdir()
                    else (tree_format.SYMLINK if member.issym() else tree_format.FILE)
                )
                name = "" if member.name == "." else member.name.removeprefix("./")
                listing.add(tree_format.Entry(
                    kind, name, member.mode & 0o7777, member.uid, member.gid, 0,
                    int(member.mtime * 1e9), size=member.size, link=member.linkname,
                ))  # fmt: skip
        reader.drain()
        return
    reader.drain()


def restore(
    client: KmsClient,
    stream: BinaryIO,
    parsed: ParsedHeader,
    output: str | None,
    *,
    action: str = "restore",
    force: bool = False,
    includes: list[str] | None = None,
    special_files: bool = False,
    quiet: bool = False,
    total: int | None = None,
    list_json: bool = False,
) -> RestoreResult:
    """Verify the archive end to end and restore it (or verify, or list it)."""
    header = parsed.header
    data_key = resolve_data_key(client, header)
    progress = Progress(total, enabled=not quiet)
    try:
        counted = ProgressReader(stream, progress)
        reader = PlaintextReader(iter_segments(counted, parsed, data_key))  # type: ignore[arg-type]
        listing = None
        if action == "verify":
            if header.version == 2 and header.payload_kind is not PayloadKind.STREAM:
                for _ in tree_format.iter_entries(tree_format.EntryReader(reader)):
                    pass  # the payload encoding is checked too, nothing is kept
            reader.drain()
        elif action == "list":
            listing = Listing(as_json=list_json)
            try:
                _list(reader, header, listing)
            except BaseException:
                listing.close()
                raise
        elif output == STDIO:
            _restore_to_stdout(reader, header)
        else:
            assert output is not None
            target = Path(output)
            # What restores killed outright (SIGKILL, a crash) left beside their targets.
            remove_stale_staging(target.parent, _warn)
            if header.payload_kind is PayloadKind.TREE:
                _restore_tree(reader, header, target, force, includes or [], special_files)
            else:
                _restore_file(reader, header, target, force)
    finally:
        progress.close()
    return RestoreResult(header, reader.plaintext_bytes, output, listing)


def header_summary(header: ArchiveHeader) -> dict[str, object]:
    created = datetime.datetime.fromtimestamp(header.create_time, datetime.UTC)
    return {
        "backup_id": header.backup_id,
        "key": header.key_name,
        "key_version": header.key_version,
        "format_version": header.version,
        "created": created.isoformat().replace("+00:00", "Z"),
        "payload": header.payload_kind.name.lower(),
        "compression": header.compression_label,
        "segment_size": header.segment_size,
    }


def print_inspect(header: ArchiveHeader, *, as_json: bool) -> None:
    summary = header_summary(header)
    if as_json:
        print(json.dumps(summary))
        return
    for name, value in summary.items():
        print(f"{name.replace('_', ' ')}: {value}")


def _time(ns: int) -> str:
    when = datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def print_summary(result: RestoreResult, *, as_json: bool) -> None:
    # The summary goes to stdout, unless stdout carries the payload.
    out = sys.stderr if result.target == STDIO else sys.stdout
    header = result.header
    if as_json:
        summary = {
            "backup_id": header.backup_id,
            "key": header.key_name,
            "key_version": header.key_version,
            "payload": header.payload_kind.name.lower(),
            "bytes": result.plaintext_bytes,
            "verified": True,
            "target": result.target,
        }
        print(json.dumps(summary), file=out)
        return
    action = "verified"
    if result.target == STDIO:
        action = "written to standard output"
    elif result.target:
        action = f"restored to {result.target}"
    print(
        f"backup {header.backup_id} (key {header.key_name} version {header.key_version}, "
        f"{header.payload_kind.name.lower()} of {result.plaintext_bytes} bytes): {action}",
        file=out,
    )


def _prepare(args: argparse.Namespace, header: ArchiveHeader) -> None:
    """Usage checks that need the (unverified) header: cheap, and before any server call."""
    if args.include and header.payload_kind is not PayloadKind.TREE:
        raise UsageError("--include needs a tree archive")
    if args.include and header.version == 1:
        raise UsageError("--include needs a format version 2 archive")
    if args.include and args.output is None:
        raise UsageError("--include needs -o TARGET")
    if args.output == STDIO and header.payload_kind is PayloadKind.TREE:
        raise UsageError("a tree cannot go to standard output: give -o DIRECTORY, or --list")
    if args.output not in (None, STDIO):
        check_target(Path(args.output), header.payload_kind, force=args.force)


def run(args: argparse.Namespace) -> int:
    """The exit-code table is cli_common's (run_main); this maps what only a restore meets."""
    # The connection settings are checked before the archive is read (--inspect needs none).
    config = None if args.inspect else config_from_args(args)
    try:
        with open_archive(args.archive) as stream:
            try:
                parsed = read_header(stream)
            except ArchiveError as exc:
                raise _failed_verification(args.archive, exc) from None
            if args.inspect:
                print_inspect(parsed.header, as_json=args.json)
                return EXIT_OK
            _prepare(args, parsed.header)
            assert config is not None
            total = None
            if args.archive != STDIO:
                total = max(os.fstat(stream.fileno()).st_size, 0) or None
            action = "verify" if args.verify else "list" if args.list else "restore"
            with KmsClient(config) as client:
                result = restore(
                    client, stream, parsed, args.output, action=action, force=args.force,
                    includes=args.include, special_files=args.special_files,
                    quiet=args.quiet or args.list, total=total, list_json=args.json,
                )  # fmt: skip
    except Interrupted as exc:
        raise _interrupted(f"interrupted ({exc}); nothing restored") from None
    except KeyboardInterrupt:
        raise _interrupted("interrupted; nothing restored") from None
    except ArchiveError as exc:
        raise _failed_verification(args.archive, exc) from None
    except RestoreError as exc:
        raise CliError(str(exc)) from None
    except BrokenPipeError:
        # Not the quiet stop of a listing: the reader got an incomplete restore.
        silence_stdout()
        raise CliError("standard output was closed before the restore finished") from None
    except Exception as exc:
        tarfile = sys.modules.get("tarfile")
        if tarfile is None or not isinstance(exc, tarfile.TarError):
            raise
        # Also raised by the extraction filter for members that would escape the target.
        raise CliError(f"refusing to extract the tree: {exc}") from None
    if result.listing is not None:
        try:
            result.listing.print(result.header, result.plaintext_bytes)
        finally:
            result.listing.close()
    elif not args.quiet or args.json:
        print_summary(result, as_json=args.json)
    return EXIT_OK


def _failed_verification(archive: str, exc: ArchiveError) -> CliError:
    return CliError(f"archive {archive} failed verification: {exc}", reason="ARCHIVE_INVALID")


def _interrupted(message: str) -> CliError:
    return CliError(message, exit_code=EXIT_INTERRUPTED, code="INTERRUPTED")


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # handlers are process-wide: only when running as the program
        install_signal_handlers()
    return run_main(PROG, build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
