"""kmsctl: administer keys and read the audit log.

Human tables by default, `--json` for scripts (only JSON on stdout, integers as
numbers, errors as JSON on stderr). Exit codes: 0 success, 1 the operation
failed, 2 a usage or configuration error, 130 interrupted (docs/cli.md).

Every subcommand is one row of COMMANDS: a path, its help, a function adding its
arguments and its handler. A new subcommand is a new row.
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from client import audit_tools, lifecycle_commands
from client.cli_common import (
    EXIT_FAILURE,
    EXIT_OK,
    CliParser,
    UsageError,
    add_version,
    command_hint,
    common_defaults,
    emit_json,
    printable,
    reason_text,
    run_main,
    utf8_text,
    whole_number,
)
from client.completion import SHELLS, completion_script
from client.kms_client import (
    KmsClient,
    add_connection_args,
    config_from_args,
    read_file_setting,
)
from kms.v1 import kms_pb2

PROG = "kmsctl"
IMPORTED_KEY_SIZE = 32
MAX_VERSION = 2**31 - 1
MAX_SEQUENCE = 2**63 - 1
DEFAULT_AUDIT_LIMIT = 50
MAX_AUDIT_LIMIT = 1_000_000
# The widest a table cell gets; longer values (a 129-character invalid key name) end in "…".
MAX_CELL = 40
MAX_DETAIL_CELL = 120
_64_BIT_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)

version_number = whole_number(1, MAX_VERSION)
expected_version = whole_number(0, MAX_VERSION)
audit_limit = whole_number(1, MAX_AUDIT_LIMIT)
sequence_number = whole_number(0, MAX_SEQUENCE)


def to_json(message: Message) -> dict[str, Any]:
    """Field names as in the proto, enum names, zeros kept, and 64-bit integers as numbers
    (protobuf's JSON mapping writes them as strings)."""
    document = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(message, document)
    return document


def _numbers(message: Message, document: dict[str, Any]) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.name not in document:
            continue
        value: Any = getattr(message, field.name)
        shown = document[field.name]
        if field.type in _64_BIT_TYPES:
            document[field.name] = (
                [int(v) for v in shown] if isinstance(shown, list) else int(shown)
            )
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if isinstance(shown, list):
                for item, sub in zip(value, shown, strict=False):
                    if isinstance(sub, dict):
                        _numbers(item, sub)
            elif isinstance(shown, dict) and isinstance(value, Message):
                _numbers(value, shown)


def when(timestamp: Timestamp, present: bool = True) -> str:
    if not present or (timestamp.seconds == 0 and timestamp.nanos == 0):
        return "-"
    return timestamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")


def cell(value: object, limit: int = MAX_CELL) -> str:
    """A value as a table cell: escaped, so nothing in it can forge or widen the table."""
    return printable(str(value), limit)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    cells = [list(headers), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(
            "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip()
        )


def state_name(state: int) -> str:
    return kms_pb2.KeyVersionState.Name(state).removeprefix("KEY_VERSION_STATE_").lower()  # type: ignore[arg-type]


def print_versions(versions: Sequence[kms_pb2.KeyVersion], as_json: bool) -> None:
    if as_json:
        emit_json([to_json(v) for v in versions])
        return
    print_table(
        [
            "KEY",
            "VERSION",
            "STATE",
            "ACTIVE",
            "ORIGIN",
            "CREATED",
            "DESTROY TIME",
            "BACKUPS",
            "DATA KEYS WRAPPED",
        ],
        [
            [
                cell(v.key_name),
                str(v.version),
                state_name(v.state),
                "*" if v.active else "",
                kms_pb2.KeyVersionOrigin.Name(v.origin).removeprefix("KEY_VERSION_ORIGIN_").lower(),
                when(v.create_time),
                when(v.destroy_time, v.HasField("destroy_time")),
                str(v.backup_count),
                str(v.data_keys_wrapped),
            ]
            for v in versions
        ],
    )


# -- handlers ------------------------------------------------------------------------------


def cmd_register(client: KmsClient, args: argparse.Namespace) -> int:
    material = b""
    if args.import_file is not None:
        # Bounded: a FIFO or /dev/zero is refused, not read without end.
        material = read_file_setting(Path(args.import_file), "--import-file", 4096)
        if len(material) != IMPORTED_KEY_SIZE:
            # The length is safe to say; the material itself never is.
            raise UsageError(
                f"--import-file {args.import_file} must hold exactly {IMPORTED_KEY_SIZE} bytes, "
                f"it holds {len(material)}"
            )
    version = client.register_key_version(
        args.key_name, imported_material=material, activate=args.activate
    )
    print_versions([version], args.json)
    if not args.json and not version.active:
        print(
            f"version {version.version} is not active; make it so with: "
            f"kmsctl rotate {cell(args.key_name)} {version.version}",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_rotate(client: KmsClient, args: argparse.Namespace) -> int:
    response = client.rotate_active(
        args.key_name, args.version, expected_active_version=args.expect, reason=args.reason
    )
    if args.json:
        emit_json(to_json(response))
    else:
        before = f"version {response.from_version}" if response.from_version else "no version"
        print(
            f"{cell(args.key_name)}: active version is now {response.to_version} "
            f"(was {before}; audit event {response.audit_sequence})"
        )
    return EXIT_OK


def cmd_versions(client: KmsClient, args: argparse.Namespace) -> int:
    print_versions(client.list_key_versions(args.key_name), args.json)
    return EXIT_OK


def cmd_keys(client: KmsClient, args: argparse.Namespace) -> int:
    keys = list(client.iter_keys())
    if args.json:
        emit_json([to_json(k) for k in keys])
        return EXIT_OK
    print_table(
        ["KEY", "ACTIVE", "VERSIONS", "CREATED", "NEXT ROTATION"],
        [
            [
                cell(k.name),
                str(k.active_version or "-"),
                str(k.version_count),
                when(k.create_time),
                when(k.next_rotation_time, k.HasField("next_rotation_time")),
            ]
            for k in keys
        ],
    )
    return EXIT_OK


def cmd_cancel_destroy(client: KmsClient, args: argparse.Namespace) -> int:
    version = client.cancel_key_version_destruction(args.key_name, args.version, reason=args.reason)
    print_versions([version], args.json)
    return EXIT_OK


def cmd_approve_destroy(client: KmsClient, args: argparse.Namespace) -> int:
    version = client.approve_key_version_destruction(
        args.key_name, args.version, reason=args.reason
    )
    print_versions([version], args.json)
    return EXIT_OK


def cmd_state_change(client: KmsClient, args: argparse.Namespace) -> int:
    change: dict[str, Callable[..., kms_pb2.KeyVersion]] = {
        "disable": client.disable_key_version,
        "enable": client.enable_key_version,
        "destroy": client.destroy_key_version,
    }
    if args.command == "destroy":
        lifecycle_commands.confirm_destroy(client, args)
    version = change[args.command](args.key_name, args.version, reason=args.reason)
    print_versions([version], args.json)
    return EXIT_OK


def cmd_audit_list(client: KmsClient, args: argparse.Namespace) -> int:
    # The server pages oldest first; keeping the last `limit` matches gives the newest.
    newest: collections.deque[kms_pb2.AuditEvent] = collections.deque(maxlen=args.limit)
    for event in client.iter_audit_events(
        key_name=args.key or "", page_size=1000, after_sequence=args.since
    ):
        if args.action is None or event.action == args.action:
            newest.append(event)
    events = list(reversed(newest))
    if args.json:
        emit_json([to_json(e) for e in events])
        return EXIT_OK
    print_table(
        ["SEQ", "TIME", "ACTOR", "ACTION", "OUTCOME", "STATUS", "KEY", "VER", "BACKUP", "DETAIL"],
        [
            [
                str(e.sequence),
                when(e.time),
                cell(e.actor),
                cell(e.action),
                kms_pb2.AuditOutcome.Name(e.outcome).removeprefix("AUDIT_OUTCOME_").lower(),
                cell(e.status_code),
                cell(e.key_name or "-"),
                _audit_versions(e),
                cell(e.backup_id or "-"),
                cell("; ".join(part for part in (e.reason, e.detail) if part), MAX_DETAIL_CELL),
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
        emit_json(to_json(result))
    elif result.intact:
        print(f"audit log intact: {result.events_checked} events, head {result.head_hash}")
    else:
        print(
            f"audit log BROKEN at event {result.first_broken_sequence}: "
            f"{printable(result.problem, 400)} ({result.events_checked} events checked)"
        )
    return EXIT_OK if result.intact else EXIT_FAILURE


# -- the command table ---------------------------------------------------------------------


def _key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key_name", metavar="KEY", type=utf8_text, help="the key's name")


def _version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "version", metavar="VERSION", type=version_number, help=f"1 to {MAX_VERSION}"
    )


def _reason(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reason",
        default="",
        type=reason_text,
        help="why, for the audit log (at most 1024 characters, no control characters)",
    )


def _register_arguments(parser: argparse.ArgumentParser) -> None:
    _key(parser)
    parser.add_argument(
        "--activate", action="store_true", help="make it active (a key's first version only)"
    )
    parser.add_argument(
        "--import-file", metavar="FILE", help="import exactly 32 bytes of material from FILE"
    )


def _rotate_arguments(parser: argparse.ArgumentParser) -> None:
    _key(parser)
    _version(parser)
    parser.add_argument(
        "--expect",
        type=expected_version,
        metavar="VERSION",
        help="only if this is still the active version (0: none yet)",
    )
    _reason(parser)


def _change_arguments(parser: argparse.ArgumentParser) -> None:
    _key(parser)
    _version(parser)
    _reason(parser)


def _destroy_arguments(parser: argparse.ArgumentParser) -> None:
    _change_arguments(parser)
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _backups_arguments(parser: argparse.ArgumentParser) -> None:
    _key(parser)
    lifecycle_commands.backups_arguments(parser)


def _retire_arguments(parser: argparse.ArgumentParser) -> None:
    _key(parser)
    _version(parser)
    lifecycle_commands.retire_arguments(parser)


def _auto_rotate_arguments(parser: argparse.ArgumentParser) -> None:
    _key(parser)
    lifecycle_commands.auto_rotate_arguments(parser)


def _action_name(text: str) -> str:
    if (
        not text
        or len(text) > 64
        or not all(c.isascii() and (c.isalnum() or c in "._") for c in text)
    ):
        raise argparse.ArgumentTypeError(
            f"must be an action name such as key.rotate, not {printable(text)}"
        )
    return text


def _audit_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", type=utf8_text, help="only events about this key")
    parser.add_argument(
        "--action", type=_action_name, help="only events of this action, e.g. key.rotate"
    )
    parser.add_argument(
        "--since",
        type=sequence_number,
        default=0,
        metavar="SEQ",
        help="only events after sequence number SEQ",
    )
    parser.add_argument(
        "--limit",
        type=audit_limit,
        default=DEFAULT_AUDIT_LIMIT,
        help=f"at most this many, the newest (default {DEFAULT_AUDIT_LIMIT})",
    )


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("rotate",) or ("audit", "list")
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    # (client, args), or (args) alone for a command that needs no server.
    handler: Callable[..., int]
    needs_server: bool = True


COMMANDS: list[Command] = [
    Command(("register",), "add a key version", _register_arguments, cmd_register),
    Command(("rotate",), "make a version active", _rotate_arguments, cmd_rotate),
    Command(("versions",), "list a key's versions", _key, cmd_versions),
    Command(("keys",), "list keys", _no_arguments, cmd_keys),
    Command(
        ("disable",), "disable a version (not the active one)", _change_arguments, cmd_state_change
    ),
    Command(("enable",), "enable a disabled version", _change_arguments, cmd_state_change),
    Command(
        ("destroy",),
        "schedule a version's crypto-shredding (cancellable until due): its backups go with it",
        _destroy_arguments,
        cmd_state_change,
    ),
    Command(
        ("cancel-destroy",),
        "cancel a scheduled or pending destruction (the version becomes disabled)",
        _change_arguments,
        cmd_cancel_destroy,
    ),
    Command(
        ("approve-destroy",),
        "approve another admin's destroy (two-person rule): the waiting period starts",
        _change_arguments,
        cmd_approve_destroy,
    ),
    Command(
        ("backups",),
        "list the backups bound to a key or one version",
        _backups_arguments,
        lifecycle_commands.cmd_backups,
    ),
    Command(
        ("retire",),
        "move every backup of a version to the active version (rewrap), so it can go",
        _retire_arguments,
        lifecycle_commands.cmd_retire,
    ),
    Command(
        ("auto-rotate",),
        "rotate a key automatically every period, or --off",
        _auto_rotate_arguments,
        lifecycle_commands.cmd_auto_rotate,
    ),
    Command(
        ("audit", "list"),
        "list audit events, newest first",
        _audit_list_arguments,
        cmd_audit_list,
    ),
    Command(
        ("audit", "verify"),
        "check the hash chain, its MACs and the state against the log; exit 1 if broken",
        _no_arguments,
        cmd_audit_verify,
    ),
    Command(
        ("audit", "checkpoint"),
        "save a checkpoint of the log signed by the server",
        audit_tools.checkpoint_arguments,
        audit_tools.cmd_checkpoint,
    ),
    Command(
        ("audit", "export"),
        "write the events as JSON Lines, then a signed checkpoint of the last one",
        audit_tools.export_arguments,
        audit_tools.cmd_export,
    ),
    Command(
        ("audit", "public-key"),
        "print the audit signing key's public key (PEM)",
        _no_arguments,
        audit_tools.cmd_public_key,
    ),
    Command(
        ("audit", "verify-export"),
        "verify an export offline (no server): links, signature, a kept checkpoint",
        audit_tools.verify_export_arguments,
        audit_tools.cmd_verify_export,
        needs_server=False,
    ),
]
GROUP_HELP = {"audit": "read and verify the audit log"}
COMMON_DEFAULTS: dict[str, Any] = {"json": False}


def _common(parser: argparse.ArgumentParser) -> None:
    """Options accepted before and after the subcommand (`kmsctl --json keys`, `kmsctl keys
    --json`); SUPPRESSed, so a subcommand's parser does not reset what the top one read."""
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="JSON on stdout, errors as JSON on stderr",
    )
    add_connection_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog=PROG, description="Administer the backup KMS (docs/cli.md).")
    add_version(parser, PROG)
    _common(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for command in COMMANDS:
        *group_path, name = command.path
        where: Any = commands
        if group_path:
            group = group_path[0]
            if group not in groups:
                group_parser = commands.add_parser(group, help=GROUP_HELP.get(group))
                groups[group] = group_parser.add_subparsers(
                    dest=f"{group}_command", required=True, metavar="ACTION"
                )
            where = groups[group]
        sub = where.add_parser(name, help=command.help, description=command.help)
        _common(sub)
        command.arguments(sub)
        sub.set_defaults(handler=command.handler, needs_server=command.needs_server)
    completion = commands.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=SHELLS)
    return parser


def run(args: argparse.Namespace) -> int:
    common_defaults(args, COMMON_DEFAULTS)
    if args.command == "completion":  # reached only with options before it
        sys.stdout.write(completion_script(PROG, build_parser(), args.shell))
        return EXIT_OK
    handler: Callable[..., int] = args.handler
    if not args.needs_server:  # no connection setting is read, none is made
        result: int = handler(args)
        return result
    with KmsClient(config_from_args(args)) as client:
        return handler(client, args)


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, build_parser, run, argv, hint=command_hint)


if __name__ == "__main__":
    sys.exit(main())
