"""The RPCs of kms.v1 and the audit action each one records."""

from __future__ import annotations

from server.domain.model import Action

SERVICE_NAME = "kms.v1.KeyManagementService"

ACTION_BY_METHOD: dict[str, Action] = {
    f"/{SERVICE_NAME}/{method}": action
    for method, action in {
        "RegisterKeyVersion": Action.REGISTER_VERSION,
        "RotateActive": Action.ROTATE,
        "GetActiveKey": Action.ISSUE_DATA_KEY,
        "ResolveKeyForBackup": Action.RESOLVE_DATA_KEY,
        "GetKeyVersion": Action.GET_VERSION,
        "ListKeyVersions": Action.LIST_VERSIONS,
        "ListKeys": Action.LIST_KEYS,
        "DisableKeyVersion": Action.DISABLE_VERSION,
        "EnableKeyVersion": Action.ENABLE_VERSION,
        "DestroyKeyVersion": Action.SCHEDULE_DESTROY,
        "CancelKeyVersionDestruction": Action.CANCEL_DESTROY,
        "ApproveKeyVersionDestruction": Action.APPROVE_DESTROY,
        "ListBackups": Action.LIST_BACKUPS,
        "RewrapBackups": Action.REWRAP_BACKUPS,
        "UpdateKey": Action.UPDATE_KEY,
        "ListAuditEvents": Action.LIST_AUDIT,
        "VerifyAuditLog": Action.VERIFY_AUDIT,
        "GetAuditCheckpoint": Action.CHECKPOINT_AUDIT,
        "GetAuditPublicKey": Action.READ_AUDIT_PUBLIC_KEY,
    }.items()
}

# Answered without credentials: load balancers and grpcurl must reach these.
PUBLIC_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
