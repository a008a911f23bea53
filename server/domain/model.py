"""The vocabulary of the service: roles, actions, states and the values use cases return."""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass, field

from server.domain.errors import InvalidArgument

KEY_MATERIAL_BYTES = 32  # AES-256
MAX_NAME_LENGTH = 128
MAX_VERSION = 2**31 - 1  # versions are stored as 32-bit integers
MAX_SEQUENCE = 2**63 - 1  # audit sequence numbers are stored as 64-bit integers
MAX_REASON_LENGTH = 1024
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100

KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
BACKUP_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class Role(enum.StrEnum):
    ADMIN = "admin"
    BACKUP = "backup"
    RESTORE = "restore"
    AUDITOR = "auditor"


class Action(enum.StrEnum):
    """What an audit event records was attempted."""

    REGISTER_VERSION = "key_version.register"
    ROTATE = "key.rotate"
    ISSUE_DATA_KEY = "data_key.issue"
    RESOLVE_DATA_KEY = "data_key.resolve"
    RECOVER_BINDING = "data_key.recover_binding"
    GET_VERSION = "key_version.get"
    LIST_VERSIONS = "key_version.list"
    LIST_KEYS = "key.list"
    DISABLE_VERSION = "key_version.disable"
    ENABLE_VERSION = "key_version.enable"
    # Carried out (by the scheduler once due; immediately before scheduling existed).
    DESTROY_VERSION = "key_version.destroy"
    SCHEDULE_DESTROY = "key_version.schedule_destroy"
    PREVIEW_DESTROY = "key_version.preview_destroy"  # validate_only: changes nothing
    CANCEL_DESTROY = "key_version.cancel_destroy"
    APPROVE_DESTROY = "key_version.approve_destroy"
    LIST_BACKUPS = "backup.list"
    REWRAP_BACKUPS = "backup.rewrap"
    UPDATE_KEY = "key.update"
    LIST_AUDIT = "audit.list"
    VERIFY_AUDIT = "audit.verify"
    CHECKPOINT_AUDIT = "audit.checkpoint"
    READ_AUDIT_PUBLIC_KEY = "audit.public_key"
    # Written once, when the server's audit keys are made: the keyed chain starts here.
    START_KEYED_AUDIT = "audit.keyed_chain_start"
    # One event per peer per interval for the calls refused unauthenticated beyond the limit.
    UNAUTHENTICATED_SUMMARY = "auth.unauthenticated_summary"
    # A batch of `kms-server rewrap-root-keys`: blobs moved to the current root key.
    ROOT_KEY_REWRAP = "root_key.rewrap"
    # A server started with a root key the database did not know: its check value recorded.
    ROOT_KEY_RECORD = "root_key.record"


class VersionState(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    # Unusable, with its material kept until `destroy_due_us`; cancellable until then.
    DESTROY_SCHEDULED = "destroy_scheduled"
    # Unusable, a destroy asked for and waiting for a second admin (policy destroy_approvals).
    PENDING_APPROVAL = "pending_approval"
    DESTROYED = "destroyed"


class VersionOrigin(enum.StrEnum):
    GENERATED = "generated"
    IMPORTED = "imported"


class Outcome(enum.StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"


ANONYMOUS = "anonymous"
# The actor of what the servers do on their own (due destructions).
SCHEDULER = "system:scheduler"

# Data keys one key version may wrap before its key is rotated (rotation by use). AES-GCM
# with random 96-bit nonces must stay well below 2^32 encryptions per key (NIST SP 800-38D).
DEFAULT_MAX_DATA_KEYS_PER_VERSION = 2**30
MAX_DATA_KEYS_PER_VERSION = 2**31
# Above any batch (group commit's 256; a retirement batch is cut to the bound), so one
# rotation always makes room for a whole batch.
MIN_DATA_KEYS_PER_VERSION = 1000


@dataclass(frozen=True)
class KeyScope:
    """The keys a grant covers: exact names and `*` patterns, compiled once at policy load.

    `allows` is a set lookup or one compiled match: it sits on the data-key path.
    """

    names: frozenset[str] = frozenset()
    pattern: re.Pattern[str] | None = None
    everything: bool = False

    def allows(self, key_name: str) -> bool:
        if self.everything or key_name in self.names:
            return True
        return self.pattern is not None and self.pattern.fullmatch(key_name) is not None


EVERY_KEY = KeyScope(everything=True)
NO_KEY = KeyScope()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its roles, and for each role the keys it applies to."""

    name: str
    roles: frozenset[Role]
    # Role -> scope. Without one, a role covers every key (callers built in code, tests).
    scopes: dict[Role, KeyScope] | None = field(default=None, compare=False, hash=False)

    def scope(self, role: Role) -> KeyScope:
        if role not in self.roles:
            return NO_KEY
        if self.scopes is None:
            return EVERY_KEY
        return self.scopes.get(role, NO_KEY)


@dataclass(frozen=True)
class KeyVersionInfo:
    key_name: str
    version: int
    state: VersionState
    active: bool
    origin: VersionOrigin
    created_us: int
    destroyed_us: int | None
    # When a scheduled destruction falls due, and the admin who asked for it.
    destroy_due_us: int | None = None
    destroy_requested_by: str | None = None
    destroy_approved_by: str | None = None
    backup_count: int | None = None  # filled in where it was counted
    data_keys_wrapped: int = 0


@dataclass(frozen=True)
class BackupInfo:
    backup_id: str
    key_name: str
    version: int
    created_us: int


@dataclass(frozen=True)
class KeyInfo:
    name: str
    active_version: int | None
    version_count: int
    created_us: int
    rotation_period_us: int | None = None
    next_rotation_us: int | None = None


@dataclass(frozen=True)
class Rotation:
    from_version: int | None
    to_version: int
    rotated_us: int
    audit_sequence: int


@dataclass(frozen=True)
class DataKey:
    """A backup's data key: handed out by GetActiveKey and ResolveKeyForBackup only."""

    backup_id: str
    key_name: str
    version: int
    plaintext: bytes
    wrapped: bytes
    recovered: bool = False

    def __repr__(self) -> str:  # never let a data key reach a log through repr()
        return f"DataKey(backup_id={self.backup_id!r}, key={self.key_name!r}, v{self.version})"


@dataclass(frozen=True)
class AuditEvent:
    sequence: int
    time_us: int
    actor: str
    action: str
    outcome: str
    status_code: str
    key_name: str
    version: int
    from_version: int
    to_version: int
    backup_id: str
    reason: str
    detail: str
    previous_hash: str
    event_hash: str
    # Hex HMAC under the audit MAC key; None for events older than the keyed chain.
    mac: str | None = None


@dataclass(frozen=True)
class AuditHead:
    """The newest event's sequence and hash, with the head's own MAC."""

    sequence: int
    event_hash: str
    mac: str | None


@dataclass(frozen=True)
class AuditVerification:
    intact: bool
    events_checked: int
    first_broken_sequence: int
    problem: str
    head_hash: str
    # The first event that carries a MAC: events before it predate the keyed chain.
    keyed_from_sequence: int = 1


@dataclass(frozen=True)
class AuditCheckpoint:
    """The server's signature over an event's sequence and chain hash."""

    sequence: int
    chain_hash: str
    time_us: int
    key_id: str
    signature: str


def check_key_name(key_name: str) -> str:
    if not key_name:
        raise InvalidArgument("KEY_NAME_MISSING", "key_name is required")
    if KEY_NAME_PATTERN.fullmatch(key_name) is None:
        raise InvalidArgument(
            "KEY_NAME_INVALID",
            f"key_name must be 1 to {MAX_NAME_LENGTH} characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit",
        )
    return key_name


def check_backup_id(backup_id: str) -> str:
    if not backup_id:
        raise InvalidArgument("BACKUP_ID_MISSING", "backup_id is required")
    if BACKUP_ID_PATTERN.fullmatch(backup_id) is None:
        raise InvalidArgument(
            "BACKUP_ID_INVALID",
            f"backup_id must be 1 to {MAX_NAME_LENGTH} characters from A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit",
        )
    return backup_id


def check_version(version: int, field: str = "version") -> int:
    if version < 1:
        raise InvalidArgument("VERSION_INVALID", f"{field} must be at least 1")
    if version > MAX_VERSION:
        raise InvalidArgument("VERSION_INVALID", f"{field} must be at most {MAX_VERSION}")
    return version


REASON_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def check_reason(reason: str) -> str:
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgument(
            "REASON_TOO_LONG", f"reason must be at most {MAX_REASON_LENGTH} characters"
        )
    # Controls (tab included) forge lines or escapes in logs and terminals; format characters
    # (bidi overrides such as U+202E, zero-width U+200B) and line or paragraph separators make
    # a displayed audit line read differently from what is stored.
    if any(unicodedata.category(c) in REASON_FORBIDDEN_CATEGORIES for c in reason):
        raise InvalidArgument(
            "REASON_INVALID",
            "reason must not contain control, format or line/paragraph separator characters "
            "(tabs, bidi controls and zero-width characters included)",
        )
    return reason


def check_page_size(page_size: int) -> int:
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


def check_page_token(page_token: str) -> int:
    """Page tokens are the last position of the previous page, as a decimal string."""
    if not page_token:
        return 0
    # ASCII digits only (str.isdigit also accepts "²", which int() refuses), within BIGINT.
    if (
        len(page_token) > 19
        or not (page_token.isascii() and page_token.isdigit())
        or int(page_token) > MAX_SEQUENCE
    ):
        raise InvalidArgument("PAGE_TOKEN_INVALID", "page_token is not one this server issued")
    return int(page_token)
