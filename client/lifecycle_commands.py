"""kmsctl's key-lifecycle commands: the blast radius of a destroy, cancel-destroy, backups."""

from __future__ import annotations

import argparse
import sys

from client.cli_common import (
    EXIT_FAILURE,
    EXIT_OK,
    CliError,
    UsageError,
    emit_json,
    printable,
    whole_number,
)
from client.kms_client import KmsClient
from kms.v1 import kms_pb2


def blast_radius(version: kms_pb2.KeyVersion) -> str:
    """The sentence a person reads before confirming a destroy."""
    due = version.destroy_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
    count = version.backup_count
    backups = "1 backup" if count == 1 else f"{count} backups"
    return (
        f"destroying {version.key_name} version {version.version} makes {backups} "
        f"unrestorable on {due}"
    )


def confirm_destroy(client: KmsClient, args: argparse.Namespace) -> None:
    """Says what the destroy costs (the server checks the version exists and may be destroyed,
    changing nothing), then asks; `--yes` skips only the question."""
    preview = client.preview_destroy(args.key_name, args.version)
    print(blast_radius(preview), file=sys.stderr)
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(
            "destroy cannot be undone once due: pass --yes when not on a terminal",
            reason="NOT_CONFIRMED",
        )
    answer = input(
        f"Until then `kmsctl cancel-destroy {printable(args.key_name, 40)} {args.version}` "
        "cancels it. Type the key name to confirm: "
    )
    if answer.strip() != args.key_name:
        raise CliError("not destroyed: the answer was not the key name", reason="NOT_CONFIRMED")


def retire_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size",
        type=whole_number(1, MAX_BATCH_SIZE),
        default=0,
        help=f"backups per call, 1 to {MAX_BATCH_SIZE} (default: the server's)",
    )


def auto_rotate_arguments(parser: argparse.ArgumentParser) -> None:
    period = parser.add_mutually_exclusive_group(required=True)
    period.add_argument("--every", type=duration, help="the period: 90d, 12h, 30m, 45s")
    period.add_argument("--off", action="store_true", help="stop rotating automatically")


def backups_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--version",
        type=whole_number(1, 2**31 - 1),
        default=0,
        help="only this version's backups",
    )


MAX_BATCH_SIZE = 10_000


_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """Seconds in 30s, 15m, 24h or 90d."""
    number, unit = text[:-1], text[-1:]
    if unit not in _UNIT_SECONDS or not (number.isascii() and number.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90d, 12h or 30m")
    return int(number) * _UNIT_SECONDS[unit]


def cmd_auto_rotate(client: KmsClient, args: argparse.Namespace) -> int:
    key = client.update_key(args.key_name, 0 if args.off else args.every)
    if args.json:
        emit_json({
            "name": key.name,
            "rotation_period_seconds": key.rotation_period_seconds,
            "next_rotation_time": key.next_rotation_time.ToJsonString()
            if key.HasField("next_rotation_time") else None,
        })  # fmt: skip
    elif key.HasField("next_rotation_time"):
        next_time = key.next_rotation_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
        print(f"{key.name}: rotates every {key.rotation_period_seconds}s, next at {next_time}")
    else:
        print(f"{key.name}: automatic rotation off")
    return EXIT_OK


def cmd_retire(client: KmsClient, args: argparse.Namespace) -> int:
    """Batches until none remain; progress on a terminal, the totals at the end."""
    total = 0
    progress = sys.stderr.isatty() and not args.json
    while True:
        batch = client.rewrap_backups(args.key_name, args.version, args.batch_size)
        total += batch.rewrapped
        if progress:
            print(
                f"\rretiring {printable(args.key_name, 40)} version {args.version}: "
                f"{total} rewrapped, {batch.remaining} to go ",
                end="",
                file=sys.stderr,
                flush=True,
            )
        if batch.remaining == 0 or batch.rewrapped == 0:
            break
    if progress:
        print(file=sys.stderr)
    if args.json:
        summary = {
            "key_name": args.key_name,
            "from_version": args.version,
            "to_version": batch.to_version,
            "rewrapped": total,
            "remaining": batch.remaining,
        }
        emit_json(summary)
    else:
        print(
            f"{args.key_name} version {args.version}: {total} backups rewrapped under version "
            f"{batch.to_version}; {batch.remaining} remain"
        )
    return EXIT_OK if batch.remaining == 0 else EXIT_FAILURE


def cmd_backups(client: KmsClient, args: argparse.Namespace) -> int:
    found = list(client.iter_backups(args.key_name, args.version))
    if args.json:
        rows = [
            {
                "backup_id": b.backup_id,
                "key_name": b.key_name,
                "version": b.version,
                "create_time": b.create_time.ToJsonString(),
            }
            for b in found
        ]
        emit_json(rows)
        return EXIT_OK
    name = printable(args.key_name, 40)
    which = f"{name} version {args.version}" if args.version else name
    print(f"{len(found)} backups bound to {which}")
    for backup in found:
        created = backup.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
        print(f"{backup.backup_id}  version {backup.version}  {created}")
    return EXIT_OK
