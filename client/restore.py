"""kms-restore: verify and decrypt an archive made by kms-backup.

    kms-restore ARCHIVE -o TARGET [--force]
    kms-restore --verify ARCHIVE

Nothing unverified becomes visible: the payload is decrypted to a temporary
path beside TARGET and renamed into place only after the last segment
verified; a tree is extracted (safely) only from a fully verified tar.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import grpc

from client.archive import (
    DATA_KEY_SIZE,
    ArchiveError,
    ArchiveHeader,
    ParsedHeader,
    PayloadKind,
    decrypt_to,
    read_header,
    verify,
)
from client.cli_common import (
    EXIT_OK,
    describe_kms_error,
    fsync_directory,
    print_error,
    remove_quietly,
)
from client.kms_client import (
    ConfigError,
    KmsClient,
    KmsError,
    add_connection_args,
    config_from_args,
)
from kms.v1 import kms_pb2

if TYPE_CHECKING:
    import tarfile

PROG = "kms-restore"
STDIO = "-"
COPY_CHUNK = 1 << 20


class RestoreError(Exception):
    """Restore cannot go on; the message says why in words."""


@dataclass(frozen=True)
class RestoreResult:
    header: ArchiveHeader
    plaintext_bytes: int
    target: str | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Verify and restore an encrypted backup archive."
    )
    parser.add_argument("archive", help="archive path, or - for stdin")
    parser.add_argument("-o", "--output", help="where to restore; - for stdout")
    parser.add_argument(
        "--verify", action="store_true", help="check the whole archive, write nothing"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing target")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
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
    with open(archive, "rb") as stream:
        yield stream


def _install(staged: Path, target: Path, *, force: bool) -> None:
    """Rename the verified result into place, replacing the old target only with --force."""
    if not (target.exists() or target.is_symlink()):
        os.rename(staged, target)
    elif not force:
        raise RestoreError(f"{target} already exists (use --force to replace it)")
    elif target.is_dir() and not target.is_symlink():
        # A directory cannot be replaced by one rename: move it aside first, then drop it.
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, aside / "old")
        try:
            os.rename(staged, target)
        except OSError:
            os.rename(aside / "old", target)
            shutil.rmtree(aside, ignore_errors=True)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staged, target)
    fsync_directory(target.parent)


def _decrypt_to_temp_file(
    stream: BinaryIO, parsed: ParsedHeader, data_key: bytes, directory: Path, prefix: str
) -> tuple[Path, int]:
    """Decrypt the whole archive into a new temporary file; deleted again on failure."""
    with tempfile.NamedTemporaryFile(
        dir=directory, prefix=prefix, suffix=".restoring", delete=False
    ) as handle:
        path = Path(handle.name)
        try:
            size = decrypt_to(stream, parsed, data_key, handle)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            remove_quietly(path)
            raise
    return path, size


def _restore_symlink_times(tar: tarfile.TarFile, staging: Path) -> None:
    """tarfile leaves a symlink's own mtime at "now"; set it without following the link."""
    import tarfile

    if os.utime not in os.supports_follow_symlinks:
        return
    for member in tar.getmembers():
        if member.issym():
            # Same checks as the extraction itself, so the path is inside staging.
            safe = tarfile.tar_filter(member, str(staging))
            os.utime(staging / safe.name, (safe.mtime, safe.mtime), follow_symlinks=False)


def _extract_tree(payload: Path, target: Path, *, force: bool) -> None:
    """Extract a verified tar into a staging directory beside target, then rename it in."""
    import tarfile  # only trees need it (a measurable part of start-up otherwise)

    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.restoring-"))
    try:
        with tarfile.open(payload, mode="r:") as tar:
            # The "tar" filter refuses absolute names, "..", links out of the tree and devices.
            tar.extractall(staging, filter="tar")
            _restore_symlink_times(tar, staging)
        root_times = os.stat(staging)
        _install(staging, target, force=force)
        # Renaming a directory may touch its own times on some filesystems.
        os.utime(target, ns=(root_times.st_atime_ns, root_times.st_mtime_ns))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def restore(
    client: KmsClient, archive: str, output: str | None, *, force: bool = False
) -> RestoreResult:
    """Verify `archive` end to end and, unless output is None, restore it to `output`."""
    target = None if output in (None, STDIO) else Path(output)
    if target is not None and not force and (target.exists() or target.is_symlink()):
        raise RestoreError(f"{output} already exists (use --force to replace it)")
    if target is not None and not target.parent.is_dir():
        raise RestoreError(f"directory {target.parent} does not exist")

    with open_archive(archive) as stream:
        parsed = read_header(stream)
        header = parsed.header
        data_key = resolve_data_key(client, header)
        if output is None:
            size = verify(stream, parsed, data_key)
        elif target is None:
            # stdout cannot be taken back: verify everything into a private temp file first.
            with tempfile.TemporaryFile() as verified:
                size = decrypt_to(stream, parsed, data_key, verified)
                verified.seek(0)
                shutil.copyfileobj(verified, sys.stdout.buffer, COPY_CHUNK)
                sys.stdout.buffer.flush()
        else:
            prefix = f".{target.name}."
            payload, size = _decrypt_to_temp_file(stream, parsed, data_key, target.parent, prefix)
            try:
                if header.payload_kind is PayloadKind.TREE:
                    _extract_tree(payload, target, force=force)
                else:
                    # Like a file written by `cat > target`, not the 0600 of a temp file.
                    umask = os.umask(0)
                    os.umask(umask)
                    os.chmod(payload, 0o666 & ~umask)
                    _install(payload, target, force=force)
            finally:
                remove_quietly(payload)
    return RestoreResult(header=header, plaintext_bytes=size, target=output)


def print_summary(result: RestoreResult, *, as_json: bool) -> None:
    # stdout may carry the payload, so the summary always goes to stderr.
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
        print(json.dumps(summary), file=sys.stderr)
        return
    action = f"restored to {result.target}" if result.target else "verified"
    print(
        f"backup {header.backup_id} (key {header.key_name} version {header.key_version}, "
        f"{header.payload_kind.name.lower()} of {result.plaintext_bytes} bytes): {action}",
        file=sys.stderr,
    )


def _is_tar_error(exc: BaseException) -> bool:
    """A tarfile error, without importing tarfile for restores that never used it."""
    tarfile = sys.modules.get("tarfile")
    return tarfile is not None and isinstance(exc, tarfile.TarError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify == (args.output is not None):
        parser.error("give exactly one of -o TARGET or --verify")
    try:
        config = config_from_args(args)
        with KmsClient(config) as client:
            result = restore(client, args.archive, args.output, force=args.force)
    except ArchiveError as exc:
        return print_error(PROG, f"archive {args.archive} failed verification: {exc}")
    except (RestoreError, ConfigError) as exc:
        return print_error(PROG, str(exc))
    except OSError as exc:
        return print_error(
            PROG, str(exc) if not exc.filename else f"{exc.filename}: {exc.strerror}"
        )
    except Exception as exc:
        if not _is_tar_error(exc):
            raise
        # Also raised by the extraction filter for members that would escape the target.
        return print_error(PROG, f"refusing to extract the tree: {exc}")
    print_summary(result, as_json=args.json)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
