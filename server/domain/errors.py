"""Domain errors. Each carries the canonical status name and an AIP-193 reason.

The gRPC edge maps `status_name` to a status code in one place
(`server.api.errors`); the audit log records the same name.
"""

from __future__ import annotations

from typing import ClassVar


class KmsError(Exception):
    """A refused or failed call: a machine-readable reason plus a message for people."""

    status_name: ClassVar[str] = "UNKNOWN"
    #: Denials are audited; faults of the server itself (database down) cannot be.
    audited: ClassVar[bool] = True

    def __init__(
        self, reason: str, message: str, *, audit_status: str = "", audit_detail: str = ""
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        # What the audit log records: the real cause, where the caller is told less
        # (an out-of-scope backup is answered exactly as an unknown one).
        self.audit_status = audit_status or self.status_name
        self.audit_detail = audit_detail or message


class InvalidArgument(KmsError):
    status_name = "INVALID_ARGUMENT"


class NotFound(KmsError):
    status_name = "NOT_FOUND"


class AlreadyExists(KmsError):
    status_name = "ALREADY_EXISTS"


class FailedPrecondition(KmsError):
    status_name = "FAILED_PRECONDITION"


class Aborted(KmsError):
    status_name = "ABORTED"


class Unauthenticated(KmsError):
    status_name = "UNAUTHENTICATED"


class PermissionDenied(KmsError):
    status_name = "PERMISSION_DENIED"


class ResourceExhausted(KmsError):
    status_name = "RESOURCE_EXHAUSTED"


class IntegrityFailure(KmsError):
    """Stored data failed its integrity check (a wrapped blob or an audit row was altered)."""

    status_name = "DATA_LOSS"


class Unavailable(KmsError):
    """The database cannot be reached or is busy: retry later. Nothing was written."""

    status_name = "UNAVAILABLE"
    audited = False
