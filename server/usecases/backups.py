"""ListBackups: which backups depend on a key version (what destroying it would lose)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server import service as svc
from server.db.repository import Repository
from server.domain import model
from server.domain.errors import InvalidArgument
from server.domain.model import Action, BackupInfo, Principal, Role

if TYPE_CHECKING:
    from server.service import KeyManagementService


def list_backups(
    service: KeyManagementService,
    caller: Principal,
    key_name: str,
    version: int,
    page_size: int,
    page_token: str,
) -> tuple[list[BackupInfo], str]:
    audit = svc.AuditContext(key_name=key_name, version=version)

    def work(repo: Repository) -> tuple[list[BackupInfo], str]:
        svc._require(caller, Role.ADMIN)
        model.check_key_name(key_name)
        svc._require_key(caller, Role.ADMIN, key_name)
        if version:
            model.check_version(version)
        limit = model.check_page_size(page_size)
        after = _decode_backup_token(page_token)
        svc._existing_key(repo, key_name)
        if version:
            svc._existing_version(repo, key_name, version)
        rows = repo.list_bindings(key_name, version, after, limit + 1)
        backups = [
            BackupInfo(row.backup_id, row.key_name, row.version, row.created_us)
            for row in rows[:limit]
        ]
        next_token = backups[-1].backup_id.encode().hex() if len(rows) > limit else ""
        return backups, next_token

    return service._run(caller.name, Action.LIST_BACKUPS, audit, work)


def _decode_backup_token(page_token: str) -> str:
    """A ListBackups page token is the hex of the last backup id of the previous page."""
    if not page_token:
        return ""
    try:
        backup_id = bytes.fromhex(page_token).decode()
    except ValueError:
        backup_id = ""
    if model.BACKUP_ID_PATTERN.fullmatch(backup_id) is None:
        raise InvalidArgument("PAGE_TOKEN_INVALID", "page_token is not one this server issued")
    return backup_id
