"""The kms.v1 servicer: translates messages to service calls and domain errors to statuses."""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kms.v1 import kms_pb2, kms_pb2_grpc
from server.api.auth import CURRENT_PRINCIPAL
from server.api.errors import abort, aborted
from server.domain.errors import KmsError, Unauthenticated
from server.domain.model import (
    AuditEvent,
    KeyInfo,
    KeyVersionInfo,
    Outcome,
    Principal,
    VersionOrigin,
    VersionState,
)
from server.service import KeyManagementService
from server.usecases.recovery import BackupKeyReference

log = logging.getLogger(__name__)

T = TypeVar("T")

_STATE = {
    VersionState.ENABLED: kms_pb2.KEY_VERSION_STATE_ENABLED,
    VersionState.DISABLED: kms_pb2.KEY_VERSION_STATE_DISABLED,
    VersionState.DESTROYED: kms_pb2.KEY_VERSION_STATE_DESTROYED,
    VersionState.DESTROY_SCHEDULED: kms_pb2.KEY_VERSION_STATE_DESTROY_SCHEDULED,
    VersionState.PENDING_APPROVAL: kms_pb2.KEY_VERSION_STATE_PENDING_APPROVAL,
}
_ORIGIN = {
    VersionOrigin.GENERATED: kms_pb2.KEY_VERSION_ORIGIN_GENERATED,
    VersionOrigin.IMPORTED: kms_pb2.KEY_VERSION_ORIGIN_IMPORTED,
}
_OUTCOME: dict[str, kms_pb2.AuditOutcome.ValueType] = {
    Outcome.ALLOWED: kms_pb2.AUDIT_OUTCOME_ALLOWED,
    Outcome.DENIED: kms_pb2.AUDIT_OUTCOME_DENIED,
}


class KeyManagementServicer(kms_pb2_grpc.KeyManagementServiceServicer):
    def __init__(self, service: KeyManagementService) -> None:
        self._service = service

    def RegisterKeyVersion(
        self, request: kms_pb2.RegisterKeyVersionRequest, context: grpc.ServicerContext
    ) -> kms_pb2.RegisterKeyVersionResponse:
        info = _call(
            context,
            lambda caller: self._service.keys.register_key_version(
                caller,
                request.key_name,
                request.imported_material,
                request.activate_first_version,
            ),
        )
        return kms_pb2.RegisterKeyVersionResponse(key_version=_key_version(info))

    def RotateActive(
        self, request: kms_pb2.RotateActiveRequest, context: grpc.ServicerContext
    ) -> kms_pb2.RotateActiveResponse:
        expected = (
            request.expected_active_version if request.HasField("expected_active_version") else None
        )
        rotation = _call(
            context,
            lambda caller: self._service.keys.rotate_active(
                caller, request.key_name, request.to_version, expected, request.reason
            ),
        )
        return kms_pb2.RotateActiveResponse(
            from_version=rotation.from_version or 0,
            to_version=rotation.to_version,
            rotate_time=_timestamp(rotation.rotated_us),
            audit_sequence=rotation.audit_sequence,
        )

    # The two calls backups make all day are coroutines: they wait for their group commit
    # on the event loop instead of holding a thread each (server/api/pipeline.py).

    async def GetActiveKey(
        self,
        request: kms_pb2.GetActiveKeyRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> kms_pb2.GetActiveKeyResponse:
        key = await _call_coroutine(
            context,
            lambda caller: self._service.data_keys.get_active_key(
                caller, request.key_name, request.backup_id
            ),
        )
        return kms_pb2.GetActiveKeyResponse(
            backup_id=key.backup_id,
            key_name=key.key_name,
            version=key.version,
            data_key=key.plaintext,
            wrapped_data_key=key.wrapped,
        )

    async def ResolveKeyForBackup(
        self,
        request: kms_pb2.ResolveKeyForBackupRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> kms_pb2.ResolveKeyForBackupResponse:
        recovery = None
        if request.HasField("recovery"):
            recovery = BackupKeyReference(
                request.recovery.key_name,
                request.recovery.version,
                request.recovery.wrapped_data_key,
            )
        key = await _call_coroutine(
            context,
            lambda caller: self._service.data_keys.resolve_key_for_backup(
                caller, request.backup_id, recovery
            ),
        )
        return kms_pb2.ResolveKeyForBackupResponse(
            backup_id=key.backup_id,
            key_name=key.key_name,
            version=key.version,
            data_key=key.plaintext,
            recovered=key.recovered,
        )

    def GetKeyVersion(
        self, request: kms_pb2.GetKeyVersionRequest, context: grpc.ServicerContext
    ) -> kms_pb2.GetKeyVersionResponse:
        info = _call(
            context,
            lambda caller: self._service.keys.get_key_version(
                caller, request.key_name, request.version
            ),
        )
        return kms_pb2.GetKeyVersionResponse(key_version=_key_version(info))

    def ListKeyVersions(
        self, request: kms_pb2.ListKeyVersionsRequest, context: grpc.ServicerContext
    ) -> kms_pb2.ListKeyVersionsResponse:
        infos = _call(
            context, lambda caller: self._service.keys.list_key_versions(caller, request.key_name)
        )
        return kms_pb2.ListKeyVersionsResponse(key_versions=[_key_version(i) for i in infos])

    def ListKeys(
        self, request: kms_pb2.ListKeysRequest, context: grpc.ServicerContext
    ) -> kms_pb2.ListKeysResponse:
        keys, next_token = _call(
            context,
            lambda caller: self._service.keys.list_keys(
                caller, request.page_size, request.page_token
            ),
        )
        return kms_pb2.ListKeysResponse(
            keys=[_key(key) for key in keys],
            next_page_token=next_token,
        )

    def DisableKeyVersion(
        self, request: kms_pb2.DisableKeyVersionRequest, context: grpc.ServicerContext
    ) -> kms_pb2.DisableKeyVersionResponse:
        info = _call(
            context,
            lambda caller: self._service.keys.disable_key_version(
                caller, request.key_name, request.version, request.reason
            ),
        )
        return kms_pb2.DisableKeyVersionResponse(key_version=_key_version(info))

    def EnableKeyVersion(
        self, request: kms_pb2.EnableKeyVersionRequest, context: grpc.ServicerContext
    ) -> kms_pb2.EnableKeyVersionResponse:
        info = _call(
            context,
            lambda caller: self._service.keys.enable_key_version(
                caller, request.key_name, request.version, request.reason
            ),
        )
        return kms_pb2.EnableKeyVersionResponse(key_version=_key_version(info))

    def DestroyKeyVersion(
        self, request: kms_pb2.DestroyKeyVersionRequest, context: grpc.ServicerContext
    ) -> kms_pb2.DestroyKeyVersionResponse:
        info = _call(
            context,
            lambda caller: self._service.lifecycle.schedule_destruction(
                caller,
                request.key_name,
                request.version,
                request.reason,
                validate_only=request.validate_only,
            ),
        )
        return kms_pb2.DestroyKeyVersionResponse(key_version=_key_version(info))

    def CancelKeyVersionDestruction(
        self, request: kms_pb2.CancelKeyVersionDestructionRequest, context: grpc.ServicerContext
    ) -> kms_pb2.CancelKeyVersionDestructionResponse:
        info = _call(
            context,
            lambda caller: self._service.lifecycle.cancel_destruction(
                caller, request.key_name, request.version, request.reason
            ),
        )
        return kms_pb2.CancelKeyVersionDestructionResponse(key_version=_key_version(info))

    def UpdateKey(
        self, request: kms_pb2.UpdateKeyRequest, context: grpc.ServicerContext
    ) -> kms_pb2.UpdateKeyResponse:
        info = _call(
            context,
            lambda caller: self._service.auto_rotation.update_key(
                caller, request.key_name, request.rotation_period_seconds
            ),
        )
        return kms_pb2.UpdateKeyResponse(key=_key(info))

    def RewrapBackups(
        self, request: kms_pb2.RewrapBackupsRequest, context: grpc.ServicerContext
    ) -> kms_pb2.RewrapBackupsResponse:
        progress = _call(
            context,
            lambda caller: self._service.retirement.rewrap_backups(
                caller, request.key_name, request.from_version, request.batch_size
            ),
        )
        return kms_pb2.RewrapBackupsResponse(
            to_version=progress.to_version,
            rewrapped=progress.rewrapped,
            remaining=progress.remaining,
        )

    def ApproveKeyVersionDestruction(
        self, request: kms_pb2.ApproveKeyVersionDestructionRequest, context: grpc.ServicerContext
    ) -> kms_pb2.ApproveKeyVersionDestructionResponse:
        info = _call(
            context,
            lambda caller: self._service.lifecycle.approve_destruction(
                caller, request.key_name, request.version, request.reason
            ),
        )
        return kms_pb2.ApproveKeyVersionDestructionResponse(key_version=_key_version(info))

    def ListBackups(
        self, request: kms_pb2.ListBackupsRequest, context: grpc.ServicerContext
    ) -> kms_pb2.ListBackupsResponse:
        backups, next_token = _call(
            context,
            lambda caller: self._service.backups.list_backups(
                caller,
                request.key_name,
                request.version,
                request.page_size,
                request.page_token,
            ),
        )
        return kms_pb2.ListBackupsResponse(
            backups=[
                kms_pb2.Backup(
                    backup_id=b.backup_id,
                    key_name=b.key_name,
                    version=b.version,
                    create_time=_timestamp(b.created_us),
                )
                for b in backups
            ],
            next_page_token=next_token,
        )

    def ListAuditEvents(
        self, request: kms_pb2.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> kms_pb2.ListAuditEventsResponse:
        events, next_token = _call(
            context,
            lambda caller: self._service.audit.list_audit_events(
                caller, request.page_size, request.page_token, request.key_name
            ),
        )
        return kms_pb2.ListAuditEventsResponse(
            events=[_audit_event(e) for e in events], next_page_token=next_token
        )

    def VerifyAuditLog(
        self, request: kms_pb2.VerifyAuditLogRequest, context: grpc.ServicerContext
    ) -> kms_pb2.VerifyAuditLogResponse:
        result = _call(context, self._service.audit.verify_audit_log)
        return kms_pb2.VerifyAuditLogResponse(
            intact=result.intact,
            events_checked=result.events_checked,
            first_broken_sequence=result.first_broken_sequence,
            problem=result.problem,
            head_hash=result.head_hash,
            keyed_from_sequence=result.keyed_from_sequence,
        )

    def GetAuditCheckpoint(
        self, request: kms_pb2.GetAuditCheckpointRequest, context: grpc.ServicerContext
    ) -> kms_pb2.GetAuditCheckpointResponse:
        checkpoint = _call(
            context, lambda caller: self._service.audit.audit_checkpoint(caller, request.sequence)
        )
        return kms_pb2.GetAuditCheckpointResponse(
            checkpoint=kms_pb2.AuditCheckpoint(
                sequence=checkpoint.sequence,
                chain_hash=checkpoint.chain_hash,
                time=_timestamp(checkpoint.time_us),
                key_id=checkpoint.key_id,
                signature=base64.b64decode(checkpoint.signature),
            )
        )

    def GetAuditPublicKey(
        self, request: kms_pb2.GetAuditPublicKeyRequest, context: grpc.ServicerContext
    ) -> kms_pb2.GetAuditPublicKeyResponse:
        pem, key_id = _call(context, self._service.audit.audit_public_key)
        return kms_pb2.GetAuditPublicKeyResponse(public_key_pem=pem, key_id=key_id)


def _call(context: grpc.ServicerContext, use_case: Callable[[Principal], T]) -> T:
    """Runs a use case as the authenticated caller; domain errors end the call with their status."""
    try:
        return use_case(_caller())
    except KmsError as error:
        _log_integrity_failure(error)
        abort(context, error)
        raise AssertionError("abort returned") from None


async def _call_coroutine(
    context: grpc.aio.ServicerContext[Any, Any], use_case: Callable[[Principal], Awaitable[T]]
) -> T:
    """`_call` for a coroutine use case."""
    try:
        return await use_case(_caller())
    except KmsError as error:
        _log_integrity_failure(error)
        raise aborted(error) from None


def _caller() -> Principal:
    caller = CURRENT_PRINCIPAL.get(None)
    if caller is None:
        # Mounted without authentication (server.api.pipeline): refuse, never run anonymously.
        log.error("a call reached the servicer without an authenticated caller")
        raise Unauthenticated("NO_AUTHENTICATED_CALLER", "this call is not authenticated")
    return caller


def _log_integrity_failure(error: KmsError) -> None:
    if error.status_name == "DATA_LOSS":
        log.error("integrity failure: %s (%s)", error.message, error.reason)


def _timestamp(us: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(us)
    return stamp


def _key(info: KeyInfo) -> kms_pb2.Key:
    message = kms_pb2.Key(
        name=info.name,
        active_version=info.active_version or 0,
        version_count=info.version_count,
        create_time=_timestamp(info.created_us),
        rotation_period_seconds=(info.rotation_period_us or 0) // 1_000_000,
    )
    if info.next_rotation_us is not None:
        message.next_rotation_time.CopyFrom(_timestamp(info.next_rotation_us))
    return message


def _key_version(info: KeyVersionInfo) -> kms_pb2.KeyVersion:
    message = kms_pb2.KeyVersion(
        key_name=info.key_name,
        version=info.version,
        state=_STATE[info.state],
        active=info.active,
        origin=_ORIGIN[info.origin],
        create_time=_timestamp(info.created_us),
    )
    if info.destroyed_us is not None:
        message.destroy_time.CopyFrom(_timestamp(info.destroyed_us))
    elif info.destroy_due_us is not None:
        message.destroy_time.CopyFrom(_timestamp(info.destroy_due_us))
    message.destroy_requested_by = info.destroy_requested_by or ""
    message.destroy_approved_by = info.destroy_approved_by or ""
    message.backup_count = info.backup_count or 0
    message.data_keys_wrapped = info.data_keys_wrapped
    return message


def _audit_event(event: AuditEvent) -> kms_pb2.AuditEvent:
    return kms_pb2.AuditEvent(
        sequence=event.sequence,
        time=_timestamp(event.time_us),
        actor=event.actor,
        action=event.action,
        outcome=_OUTCOME.get(event.outcome, kms_pb2.AUDIT_OUTCOME_UNSPECIFIED),
        status_code=event.status_code,
        key_name=event.key_name,
        version=event.version,
        from_version=event.from_version,
        to_version=event.to_version,
        backup_id=event.backup_id,
        reason=event.reason,
        detail=event.detail,
        previous_hash=event.previous_hash,
        event_hash=event.event_hash,
        mac=event.mac or "",
    )
