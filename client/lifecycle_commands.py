"""kmsctl's key-lifecycle commands: the blast radius of a destroy, cancel-destroy, backups."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from client.cli_common import EXIT_OK, print_error
from client.kms_client import KmsClient
from kms.v1 import kms_pb2

PROG = "kmsctl"

Handler = Callable[[KmsClient, argparse.Namespace], int]


def blast_radius(version: kms_pb2.KeyVersion) -> str:
    """The sentence a person reads before confirming a destroy."""
    due = version.destroy_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
    count = version.backup_count
    backups = "1 backup" if count == 1 else f"{count} backups"
    return (
        f"destroying {version.key_name} version {version.version} makes {backups} "
        f"unrestorable on {due}"
    )


def confirm_destroy(client: KmsClient, args: argparse.Namespace) -> bool:
    """Says what the destroy costs (asked of the server, changing nothing), then asks;
    `--yes` skips only the question."""
    preview = client.preview_destroy(args.key_name, args.version)
    print(blast_radius(preview), file=sys.stderr)
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print_error(PROG, "destroy is irreversible: pass --yes when not on a terminal")
        return False
    answer = input(
        f"Until then `kmsctl cancel-destroy {args.key_name} {args.version}` cancels it. "
        "Type the key name to confirm: "
    )
    confirmed: bool = answer.strip() == args.key_name
    if not confirmed:
        print("not destroyed", file=sys.stderr)
    return confirmed


def add_commands(
    commands: Any,
    common: argparse.ArgumentParser,
    positive_int: Callable[[str], int],
    print_versions: Callable[[list[kms_pb2.KeyVersion], bool], None],
) -> None:
    """Registers the lifecycle subcommands on kmsctl's parser."""

    def cmd_cancel(client: KmsClient, args: argparse.Namespace) -> int:
        version = client.cancel_key_version_destruction(
            args.key_name, args.version, reason=args.reason
        )
        print_versions([version], args.json)
        return EXIT_OK

    cancel = commands.add_parser(
        "cancel-destroy",
        parents=[common],
        help="cancel a scheduled destruction (the version becomes disabled)",
    )
    cancel.add_argument("key_name", metavar="KEY")
    cancel.add_argument("version", metavar="VERSION", type=positive_int)
    cancel.add_argument("--reason", default="", help="why, for the audit log")
    cancel.set_defaults(handler=cmd_cancel)

    retire = commands.add_parser(
        "retire",
        parents=[common],
        help="move every backup of a version to the active version (rewrap), so it can go",
    )
    retire.add_argument("key_name", metavar="KEY")
    retire.add_argument("version", metavar="VERSION", type=positive_int)
    retire.add_argument("--batch-size", type=positive_int, default=0, help="backups per call")
    retire.set_defaults(handler=cmd_retire)

    def cmd_approve(client: KmsClient, args: argparse.Namespace) -> int:
        version = client.approve_key_version_destruction(
            args.key_name, args.version, reason=args.reason
        )
        print_versions([version], args.json)
        return EXIT_OK

    approve = commands.add_parser(
        "approve-destroy",
        parents=[common],
        help="approve another admin's destroy (two-person rule): the waiting period starts",
    )
    approve.add_argument("key_name", metavar="KEY")
    approve.add_argument("version", metavar="VERSION", type=positive_int)
    approve.add_argument("--reason", default="", help="why, for the audit log")
    approve.set_defaults(handler=cmd_approve)

    auto = commands.add_parser(
        "auto-rotate", parents=[common], help="rotate a key automatically every period, or --off"
    )
    auto.add_argument("key_name", metavar="KEY")
    period = auto.add_mutually_exclusive_group(required=True)
    period.add_argument("--every", type=duration, help="the period: 90d, 12h, 30m, 45s")
    period.add_argument("--off", action="store_true", help="stop rotating automatically")
    auto.set_defaults(handler=cmd_auto_rotate)

    backups = commands.add_parser(
        "backups", parents=[common], help="list the backups bound to a key or one version"
    )
    backups.add_argument("key_name", metavar="KEY")
    backups.add_argument("--version", type=positive_int, default=0, help="only this version's")
    backups.set_defaults(handler=cmd_backups)


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
        print(json.dumps({
            "name": key.name,
            "rotation_period_seconds": key.rotation_period_seconds,
            "next_rotation_time": key.next_rotation_time.ToJsonString()
            if key.HasField("next_rotation_time") else None,
        }, indent=2))  # fmt: skip
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
                f"\rretiring {args.key_name} version {args.version}: {total} rewrapped, "
                f"{batch.remaining} to go ",
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
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{args.key_name} version {args.version}: {total} backups rewrapped under version "
            f"{batch.to_version}; {batch.remaining} remain"
        )
    return EXIT_OK if batch.remaining == 0 else 1


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
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    which = f"{args.key_name} version {args.version}" if args.version else args.key_name
    print(f"{len(found)} backups bound to {which}")
    for backup in found:
        created = backup.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")
        print(f"{backup.backup_id}  version {backup.version}  {created}")
    return EXIT_OK
