"""kmsctl's audit checkpoints and exports, and the offline verification of an export.

`checkpoint`, `export` and `public-key` ask the server; `verify-export` needs neither a
server nor a database: it checks an export with `kms_audit` and the signing key's public
half, which an auditor keeps apart from the KMS.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from client.cli_common import EXIT_FAILURE, EXIT_OK, CliError, UsageError, emit_json, whole_number
from client.kms_client import KmsClient
from kms.v1 import kms_pb2
from kms_audit import checkpoint as checkpoints
from kms_audit import export as exports

# An export or checkpoint file is read whole only up to this size (a line at a time beyond).
MAX_CHECKPOINT_BYTES = 64 * 1024
MAX_PUBLIC_KEY_BYTES = 16 * 1024

_OUTCOMES = {
    kms_pb2.AUDIT_OUTCOME_ALLOWED: "allowed",
    kms_pb2.AUDIT_OUTCOME_DENIED: "denied",
}


def event_record(event: kms_pb2.AuditEvent) -> dict[str, Any]:
    """An event exactly as the server hashed it (times in microseconds, outcome as stored)."""
    return {
        "sequence": event.sequence,
        "time_us": event.time.ToMicroseconds(),
        "actor": event.actor,
        "action": event.action,
        "outcome": _OUTCOMES.get(event.outcome, ""),
        "status_code": event.status_code,
        "key_name": event.key_name,
        "version": event.version,
        "from_version": event.from_version,
        "to_version": event.to_version,
        "backup_id": event.backup_id,
        "reason": event.reason,
        "detail": event.detail,
        "previous_hash": event.previous_hash,
        "event_hash": event.event_hash,
        "mac": event.mac or None,
    }


def checkpoint_from_message(message: kms_pb2.AuditCheckpoint) -> checkpoints.Checkpoint:
    return checkpoints.Checkpoint(
        sequence=message.sequence,
        chain_hash=message.chain_hash,
        time_us=message.time.ToMicroseconds(),
        key_id=message.key_id,
        signature=base64.b64encode(message.signature).decode("ascii"),
    )


@contextmanager
def _output(target: str) -> Any:
    """Standard output for '-'; otherwise a file that appears whole or not at all."""
    if target == "-":
        yield sys.stdout
        return
    path = Path(target)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cmd_checkpoint(client: KmsClient, args: argparse.Namespace) -> int:
    checkpoint = checkpoint_from_message(client.get_audit_checkpoint(args.sequence))
    with _output(args.output) as out:
        out.write(json.dumps(checkpoint.to_json(), indent=2) + "\n")
    if args.output != "-":
        print(
            f"checkpoint of event {checkpoint.sequence} ({checkpoint.chain_hash}) signed by "
            f"{checkpoint.key_id} written to {args.output}",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_export(client: KmsClient, args: argparse.Namespace) -> int:
    last = 0
    try:
        with _output(args.output) as out:
            for event in client.iter_audit_events(after_sequence=args.since, page_size=1000):
                out.write(exports.event_line(event_record(event)) + "\n")
                last = event.sequence
            if last == 0:
                raise _NothingToExport(args.since)
            closing = checkpoint_from_message(client.get_audit_checkpoint(last))
            out.write(exports.checkpoint_line(closing) + "\n")
    except _NothingToExport as nothing:
        raise CliError(str(nothing), reason="NOTHING_TO_EXPORT") from None
    if args.output != "-":
        print(
            f"exported events {args.since + 1}..{last} with a checkpoint signed by "
            f"{closing.key_id} to {args.output}",
            file=sys.stderr,
        )
    return EXIT_OK


class _NothingToExport(Exception):
    def __init__(self, since: int) -> None:
        super().__init__(f"the audit log has no events after event {since}: nothing exported")


def cmd_public_key(client: KmsClient, args: argparse.Namespace) -> int:
    response = client.get_audit_public_key()
    if args.json:
        emit_json({"public_key_pem": response.public_key_pem, "key_id": response.key_id})
    else:
        sys.stdout.write(response.public_key_pem)
    return EXIT_OK


def cmd_verify_export(args: argparse.Namespace) -> int:
    """Offline: no connection is made."""
    public_key = _public_key(args.public_key)
    kept = _kept_checkpoint(args.checkpoint) if args.checkpoint is not None else None
    try:
        with _open_lines(args.file) as lines:
            summary = exports.verify_export(lines, public_key, kept)
    except exports.ExportInvalid as error:
        if args.json:
            emit_json({"valid": False, "problem": str(error)})
        else:
            print(f"export INVALID: {error}")
        return EXIT_FAILURE
    report = {
        "valid": True,
        "first_sequence": summary.first_sequence,
        "last_sequence": summary.last_sequence,
        "events": summary.events,
        "key_id": summary.checkpoint.key_id,
        "extends_sequence": summary.extends.sequence if summary.extends else None,
    }
    if args.json:
        emit_json(report)
    else:
        extends = (
            f"; it extends the kept checkpoint of event {summary.extends.sequence}"
            if summary.extends
            else ""
        )
        print(
            f"export verified: events {summary.first_sequence}..{summary.last_sequence} "
            f"({summary.events} events), checkpoint signed by {summary.checkpoint.key_id}"
            f"{extends}"
        )
    return EXIT_OK


def _public_key(path: Path) -> Ed25519PublicKey:
    try:
        return checkpoints.load_public_key(_read_small(path, "--public-key", MAX_PUBLIC_KEY_BYTES))
    except checkpoints.CheckpointError as error:
        raise UsageError(f"--public-key {path}: {error}") from None


def _kept_checkpoint(path: Path) -> checkpoints.Checkpoint:
    raw = _read_small(path, "--checkpoint", MAX_CHECKPOINT_BYTES)
    try:
        return checkpoints.Checkpoint.from_json(json.loads(raw))
    except (checkpoints.CheckpointError, ValueError) as error:
        raise UsageError(f"--checkpoint {path}: {error}") from None


def _read_small(path: Path, argument: str, limit: int) -> bytes:
    try:
        if not path.is_file():
            raise UsageError(f"{argument} {path}: not a regular file")
        with path.open("rb") as source:
            data = source.read(limit + 1)
    except OSError as error:
        raise UsageError(f"{argument} {path}: {error.strerror}") from None
    if len(data) > limit:
        raise UsageError(f"{argument} {path}: larger than {limit} bytes")
    return data


@contextmanager
def _open_lines(path: Path) -> Any:
    try:
        if not path.is_file():
            raise UsageError(f"FILE {path}: not a regular file")
        source: TextIO = path.open("r", encoding="utf-8", errors="strict")
    except OSError as error:
        raise UsageError(f"FILE {path}: {error.strerror}") from None
    with source:
        try:
            yield _lines(source)
        except UnicodeDecodeError:
            raise exports.ExportInvalid("the export is not UTF-8 text") from None


def _lines(source: TextIO) -> Iterable[str]:
    yield from source


sequence_number = whole_number(0, 2**63 - 1)


def checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="'-': stdout")
    parser.add_argument(
        "--sequence",
        type=sequence_number,
        default=0,
        metavar="SEQ",
        help="the event to sign (default: the newest)",
    )


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="'-': stdout")
    parser.add_argument(
        "--since",
        type=sequence_number,
        default=0,
        metavar="SEQ",
        help="only events after sequence number SEQ",
    )


def verify_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", type=Path, help="an export (kmsctl audit export)")
    parser.add_argument(
        "--public-key", required=True, type=Path, metavar="PEM", help="kmsctl audit public-key"
    )
    parser.add_argument(
        "--checkpoint", type=Path, metavar="OLD", help="a checkpoint kept from before"
    )
