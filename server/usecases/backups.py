"""ListBackups: which backups depend on a key version (what destroying it would lose)."""

from __future__ import annotations

from server.db.repository import Repository
from server.domain import model
from server.domain.model import Action, BackupInfo, Principal, Role
from server.usecases import guards, paging
from server.usecases.transactions import AuditContext, Transactions


class Backups:
    def __init__(self, transactions: Transactions) -> None:
        self._tx = transactions

    def list_backups(
        self,
        caller: Principal,
        key_name: str,
        version: int,
        page_size: int,
        page_token: str,
    ) -> tuple[list[BackupInfo], str]:
        audit = AuditContext(key_name=key_name, version=version)

        def work(repo: Repository) -> tuple[list[BackupInfo], str]:
            guards.require(caller, Role.ADMIN)
            model.check_key_name(key_name)
            guards.require_key(caller, Role.ADMIN, key_name)
            if version:
                model.check_version(version)
            limit = model.check_page_size(page_size)
            after = paging.decode_name_token(page_token, model.BACKUP_ID_PATTERN)
            guards.existing_key(repo, key_name)
            if version:
                guards.existing_version(repo, key_name, version)
            rows = repo.list_bindings(key_name, version, after, limit + 1)
            backups = [
                BackupInfo(row.backup_id, row.key_name, row.version, row.created_us)
                for row in rows[:limit]
            ]
            next_token = paging.name_token(backups[-1].backup_id) if len(rows) > limit else ""
            return backups, next_token

        return self._tx.run(caller.name, Action.LIST_BACKUPS, audit, work)
