"""The one transaction helper every use case shares: a use case and its audit event commit
together or not at all.

`Transactions.run` checks nothing itself: the use case's `work` checks the caller's role
first (permission before existence), then does its work; `run` appends the audit event in
the same transaction and reseals the rows that changed. A refused call is rolled back and
then audited as denied in a transaction of its own. Transient conflicts are retried; an
outage becomes `UNAVAILABLE`, and an audit event that cannot be written refuses the call
(fail closed).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from server.db.audit_file import AuditSinkError
from server.db.engine import make_sessionmaker
from server.db.repository import Integrity, Repository
from server.domain import model
from server.domain.errors import KmsError, Unavailable
from server.domain.model import Action, Outcome

log = logging.getLogger(__name__)

T = TypeVar("T")

# PostgreSQL SQLSTATEs worth retrying: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = {"40001", "40P01"}
UNIQUE_VIOLATION = "23505"
MAX_ATTEMPTS = 5
# What the database layer raises when it fails or cannot be reached. A pool
# timeout (sqlalchemy.exc.TimeoutError) is not a DBAPIError but is an outage too.
DATABASE_ERRORS = (sa_exc.DBAPIError, sa_exc.TimeoutError)
# What writing an audit event can raise: the database's errors, and the audit file's.
AUDIT_WRITE_ERRORS = (*DATABASE_ERRORS, AuditSinkError)


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class AuditContext:
    """What the audit event of a call says about its subject; filled in as the call learns it."""

    key_name: str = ""
    version: int = 0
    from_version: int = 0
    to_version: int = 0
    backup_id: str = ""
    reason: str = ""
    detail: str = ""


class Transactions:
    """Sessions on the key database, the integrity keys they seal rows with, and the way
    every use case runs: `run` for one call, `audit_denial` for a refusal."""

    def __init__(self, engine: Engine, on_unavailable: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.sessions: sessionmaker[Session] = make_sessionmaker(engine)
        # Told when a call fails because the database is unreachable (the health probe).
        self._on_unavailable = on_unavailable
        self._integrity: Integrity | None = None

    def open(self, integrity: Integrity) -> None:
        """Called once the server's audit and state keys are unwrapped (check_root_key)."""
        self._integrity = integrity

    @property
    def integrity(self) -> Integrity:
        if self._integrity is None:
            raise RuntimeError("check_root_key() must run before the service is used")
        return self._integrity

    def run(
        self,
        actor: str,
        action: Action,
        audit: AuditContext,
        work: Callable[[Repository], T],
        *,
        audit_on_success: bool = True,
        action_of: Callable[[], Action] | None = None,
    ) -> T:
        """Runs a use case in one transaction with its audit event; retries transient conflicts.

        `audit_on_success=False`: `work` appends its own events. `action_of`: the action the
        event names, when `work` decides it (a destroy carried out at once, a recovery)."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self.sessions.begin() as session:
                    repo = Repository(session, self.integrity)
                    result = work(repo)
                    if audit_on_success:
                        append_audit(
                            repo,
                            time_us=now_us(),
                            actor=actor,
                            action=action_of() if action_of else action,
                            outcome=Outcome.ALLOWED,
                            status_code="OK",
                            **asdict(audit),
                        )
                    # Each changed row names the event just appended, under its new MAC.
                    repo.seal_changed_state()
                return result
            except KmsError as error:
                if error.audited:
                    self.audit_denial(actor, action_of() if action_of else action, audit, error)
                raise
            except AuditWriteFailed as failed:
                # Fail closed: the transaction rolled back, so the call changed nothing.
                if attempt < MAX_ATTEMPTS and is_transient(failed.cause):
                    back_off(attempt)
                    continue
                raise self.audit_unavailable(failed.cause) from None
            except DATABASE_ERRORS as error:
                if attempt < MAX_ATTEMPTS and is_transient(error):
                    back_off(attempt)
                    continue
                raise self.unavailable(error) from None
        raise AssertionError("unreachable")

    def audit_denial(
        self, actor: str, action: Action, audit: AuditContext, error: KmsError
    ) -> None:
        """Audits a refused call in a transaction of its own."""
        fields = storable({**asdict(audit), "detail": error.audit_detail})
        try:
            with self.sessions.begin() as session:
                Repository(session, self.integrity).append_audit(
                    time_us=now_us(),
                    actor=actor,
                    action=action,
                    outcome=Outcome.DENIED,
                    status_code=error.audit_status,
                    **fields,
                )
        except AUDIT_WRITE_ERRORS as db_error:
            # Fail closed: a denial we cannot record is reported as the outage it is.
            raise self.audit_unavailable(db_error) from None

    def audit_unavailable(self, error: Exception) -> Unavailable:
        """An audit event could not be written, so the call it records was refused."""
        if isinstance(error, sa_exc.SQLAlchemyError) and is_outage(error):
            return self.unavailable(error)
        cause = error.orig if isinstance(error, sa_exc.DBAPIError) else error
        log.error(
            "audit event not written, the call was refused and changed nothing: %s: %s",
            type(cause).__name__,
            str(cause).strip()[:200],
        )
        return Unavailable(
            "AUDIT_UNAVAILABLE",
            "the audit log cannot be written, so nothing was done; retry later",
        )

    def unavailable(self, error: sa_exc.SQLAlchemyError) -> Unavailable:
        cause = error.orig if isinstance(error, sa_exc.DBAPIError) else error
        log.warning("database error: %s: %s", type(cause).__name__, str(cause).strip()[:200])
        if self._on_unavailable is not None:
            self._on_unavailable()
        return Unavailable("DATABASE_UNAVAILABLE", "the key database is unavailable; retry later")


class AuditWriteFailed(Exception):
    """The database or the audit file refused an audit event (raised inside the transaction
    it belongs to)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__("audit write failed")
        self.cause = cause


def append_audit(repo: Repository, **fields: Any) -> int:
    try:
        return repo.append_audit(**fields)
    except AUDIT_WRITE_ERRORS as error:
        raise AuditWriteFailed(error) from None


def back_off(attempt: int) -> None:
    """Waits before retrying a transient conflict: random, growing with the attempt."""
    time.sleep(random.uniform(0, 0.005 * 2**attempt))


# Audit rows hold names and ids in VARCHAR(128) and versions in 32-bit integers.
_STRING_LIMITS = {"key_name": model.MAX_NAME_LENGTH, "backup_id": model.MAX_NAME_LENGTH}


def storable(fields: dict[str, Any]) -> dict[str, Any]:
    """Makes a denial's fields fit its audit row: they may be the very input that was refused.

    Control characters are escaped (PostgreSQL text cannot hold NUL), strings are
    cut to their column's length, and numbers beyond the column's range become 0.
    """
    stored: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, str):
            value = "".join(c if c.isprintable() or c == "\t" else ascii(c)[1:-1] for c in value)
            value = value[: _STRING_LIMITS.get(name, model.MAX_REASON_LENGTH)]
        elif isinstance(value, int) and not 0 <= value <= model.MAX_VERSION:
            value = 0
        stored[name] = value
    return stored


def is_outage(error: sa_exc.SQLAlchemyError) -> bool:
    """The database is unreachable or busy, as opposed to refusing this statement."""
    if isinstance(error, sa_exc.TimeoutError):
        return True
    return isinstance(error, sa_exc.DBAPIError) and (
        error.connection_invalidated or isinstance(error, sa_exc.OperationalError)
    )


def is_transient(error: Exception) -> bool:
    if not isinstance(error, sa_exc.DBAPIError):
        return False  # a pool timeout has already waited long enough
    sqlstate = getattr(error.orig, "sqlstate", None)
    if isinstance(error, sa_exc.IntegrityError):
        # Only a duplicate key is transient (a concurrent insert of the same key or
        # binding, which the retry then sees); any other constraint always fails.
        return sqlstate == UNIQUE_VIOLATION or getattr(error.orig, "sqlite_errorname", "") in (
            "SQLITE_CONSTRAINT_PRIMARYKEY",
            "SQLITE_CONSTRAINT_UNIQUE",
        )
    if sqlstate in RETRYABLE_SQLSTATES:
        return True
    return "database is locked" in str(error.orig)
