"""kmsctl: administer keys and read the audit log.

Human tables by default, `--json` for scripts. Server errors print the status
code name, reason and message to stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from client import audit_tools, lifecycle_commands
from client.cli_common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, describe_kms_error, print_error
from client.kms_client import (
    ConfigError,
    KmsClient,
    KmsError,
    add_connection_args,
    config_from_args,
)
from kms.v1 import kms_pb2

PROG = "kmsctl"
IMPORTED_KEY_SIZE = 32


def to_json(message: Message) -> dict[str, Any]:
    # Field names as in the proto, enum names rather than numbers, zeros kept.
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def when(timestamp: Timestamp, present: bool = True) -> str:
    if not present or (timestamp.seconds == 0 and timestamp.nanos == 0):
        return "-"
    return timestamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def state_name(state: int) -> str:
    return kms_pb2.KeyVersionState.Name(state).removeprefix("KEY_VERSION_STATE_").lower()  # type: ignore[arg-type]


def print_versions(versions: Sequence[kms_pb2.KeyVersion], as_json: bool) -> None:
    if as_json:
        print(json.dumps([to_json(v) for v in versions], indent=2))
        return
    print_table(
        ["KEY", "VERSION", "STATE", "ACTIVE", "ORIGIN", "CREATED", "DESTROY TIME", "BACKUPS"],
        [
            [
                v.key_name,
                v.version,
                state_name(v.state),
                "*" if v.active else "",
                kms_pb2.KeyVersionOrigin.Name(v.origin).removeprefix("KEY_VERSION_ORIGIN_").lower(),
                when(v.create_time),
                when(v.destroy_time, v.HasField("destroy_time")),
                v.backup_count,
            ]
            for v in versions
        ],
    )


def cmd_register(client: KmsClient, args: argparse.Namespace) -> int:
    material = b""
    if args.import_file is not None:
        material = Path(args.import_file).read_bytes()
        if len(material) != IMPORTED_KEY_SIZE:
            # The length is safe to say; the material itself never is.
            return print_error(
                PROG, f"{args.import_file} must hold exactly 32 bytes, it holds {len(material)}"
            )
    version = client.register_key_version(
        args.key_name, imported_material=material, activate=args.activate
    )
    print_versions([version], args.json)
    return EXIT_OK


def cmd_rotate(client: KmsClient, args: argparse.Namespace) -> int:
    response = client.rotate_active(
        args.key_name, args.version, expected_active_version=args.expect, reason=args.reason
    )
    if args.json:
        print(json.dumps(to_json(response), indent=2))
    else:
        print(
            f"{args.key_name}: active version {response.from_version} -> {response.to_version} "
            f"(audit event {response.audit_sequence})"
        )
    return EXIT_OK


def cmd_versions(client: KmsClient, args: argparse.Namespace) -> int:
    print_versions(client.list_key_versions(args.key_name), args.json)
    return EXIT_OK


def cmd_keys(client: KmsClient, args: argparse.Namespace) -> int:
    keys = list(client.iter_keys())
    if args.json:
        print(json.dumps([to_json(k) for k in keys], indent=2))
        return EXIT_OK
    print_table(
        ["KEY", "ACTIVE", "VERSIONS", "CREATED", "NEXT ROTATION"],
        [
            [
                k.name,
                k.active_version or "-",
                k.version_count,
                when(k.create_time),
                when(k.next_rotation_time, k.HasField("next_rotation_time")),
            ]
            for k in keys
        ],
    )
    return EXIT_OK


def cmd_state_change(client: KmsClient, args: argparse.Namespace) -> int:
    change: dict[str, Callable[..., kms_pb2.KeyVersion]] = {
        "disable": client.disable_key_version,
        "enable": client.enable_key_version,
        "destroy": client.destroy_key_version,
    }
    if args.command == "destroy" and not lifecycle_commands.confirm_destroy(client, args):
        return EXIT_FAILURE
    version = change[args.command](args.key_name, args.version, reason=args.reason)
    print_versions([version], args.json)
    return EXIT_OK


def cmd_audit_list(client: KmsClient, args: argparse.Namespace) -> int:
    events: list[kms_pb2.AuditEvent] = []
    for event in client.iter_audit_events(key_name=args.key or ""):
        if args.limit is not None and len(events) >= args.limit:
            break
        events.append(event)
    if args.json:
        print(json.dumps([to_json(e) for e in events], indent=2))
        return EXIT_OK
    print_table(
        ["SEQ", "TIME", "ACTOR", "ACTION", "OUTCOME", "STATUS", "KEY", "VER", "BACKUP", "DETAIL"],
        [
            [
                e.sequence,
                when(e.time),
                e.actor,
                e.action,
                kms_pb2.AuditOutcome.Name(e.outcome).removeprefix("AUDIT_OUTCOME_").lower(),
                e.status_code,
                e.key_name or "-",
                _audit_versions(e),
                e.backup_id or "-",
                "; ".join(part for part in (e.reason, e.detail) if part),
            ]
            for e in events
        ],
    )
    return EXIT_OK


def _audit_versions(event: kms_pb2.AuditEvent) -> str:
    """A rotation shows from->to; other events the version they concern."""
    if event.action == "key.rotate":
        return f"{event.from_version or '-'}->{event.to_version}"
    return str(event.version or "-")


def cmd_audit_verify(client: KmsClient, args: argparse.Namespace) -> int:
    result = client.verify_audit_log()
    if args.json:
        print(json.dumps(to_json(result), indent=2))
    elif result.intact:
        print(f"audit log intact: {result.events_checked} events, head {result.head_hash}")
    else:
        print(
            f"audit log BROKEN at event {result.first_broken_sequence}: {result.problem} "
            f"({result.events_checked} events checked)"
        )
    return EXIT_OK if result.intact else EXIT_FAILURE


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Shared options go on every subcommand so they may follow it: `kmsctl keys --json`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    add_connection_args(common)

    parser = argparse.ArgumentParser(prog=PROG, description="Administer the backup KMS.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    register = commands.add_parser("register", parents=[common], help="add a key version")
    register.add_argument("key_name", metavar="KEY")
    register.add_argument(
        "--activate", action="store_true", help="activate it (first version only)"
    )
    register.add_argument(
        "--import-file", type=Path, help="import 32 bytes of material from this file"
    )
    register.set_defaults(handler=cmd_register)

    rotate = commands.add_parser("rotate", parents=[common], help="make a version active")
    rotate.add_argument("key_name", metavar="KEY")
    rotate.add_argument("version", metavar="VERSION", type=positive_int)
    rotate.add_argument(
        "--expect",
        type=non_negative_int,
        help="only if this is still the active version (0: none yet)",
    )
    rotate.add_argument("--reason", default="", help="why, for the audit log")
    rotate.set_defaults(handler=cmd_rotate)

    versions = commands.add_parser("versions", parents=[common], help="list a key's versions")
    versions.add_argument("key_name", metavar="KEY")
    versions.set_defaults(handler=cmd_versions)

    keys = commands.add_parser("keys", parents=[common], help="list keys")
    keys.set_defaults(handler=cmd_keys)

    for name, help_text in [
        ("disable", "disable a version (not the active one)"),
        ("enable", "enable a disabled version"),
        ("destroy", "schedule a version's crypto-shredding (cancellable until due)"),
    ]:
        change = commands.add_parser(name, parents=[common], help=help_text)
        change.add_argument("key_name", metavar="KEY")
        change.add_argument("version", metavar="VERSION", type=positive_int)
        change.add_argument("--reason", default="", help="why, for the audit log")
        if name == "destroy":
            change.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        change.set_defaults(handler=cmd_state_change)

    lifecycle_commands.add_commands(commands, common, positive_int, print_versions)

    audit = commands.add_parser("audit", help="read and verify the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    audit_list = audit_commands.add_parser("list", parents=[common], help="list audit events")
    audit_list.add_argument("--key", help="only events about this key")
    audit_list.add_argument("--limit", type=positive_int, help="at most this many events")
    audit_list.set_defaults(handler=cmd_audit_list)
    audit_verify = audit_commands.add_parser(
        "verify", parents=[common], help="check the hash chain; exit 1 if broken"
    )
    audit_verify.set_defaults(handler=cmd_audit_verify)
    offline_common = argparse.ArgumentParser(add_help=False)
    offline_common.add_argument("--json", action="store_true", help="machine-readable output")
    audit_tools.add_commands(audit_commands, common, offline_common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    offline = getattr(args, "offline_handler", None)
    if offline is not None:  # needs no server: no connection settings are read
        result: int = offline(args)
        return result
    handler: Callable[[KmsClient, argparse.Namespace], int] = args.handler
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print_error(PROG, str(exc))
        return EXIT_USAGE
    try:
        with KmsClient(config) as client:
            return handler(client, args)
    except KmsError as exc:
        return print_error(PROG, describe_kms_error(exc))
    except OSError as exc:
        return print_error(
            PROG, str(exc) if not exc.filename else f"{exc.filename}: {exc.strerror}"
        )
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return print_error(PROG, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
