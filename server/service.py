"""The key-management service: its use cases (server.usecases) wired over one database and
one root keyring.

Each group of use cases is one module and one object here, and the servicer calls them:
`keys` (register, rotate, read, disable, enable), `data_keys` (GetActiveKey and
ResolveKeyForBackup, with their group commit), `audit` (list, verify, checkpoint),
`lifecycle` (scheduled destruction, two-person rule), `backups` (ListBackups), `retirement`
(rewrap), `auto_rotation` (by period and by use), and the `scheduler` thread that carries out
what falls due. All of them run through one `Transactions`.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine

from server.domain import model
from server.keystore import crypto, server_keys
from server.keystore.material_cache import DEFAULT_MAX_AGE_SECONDS
from server.keystore.server_keys import AuditSink, ServerKeys
from server.usecases.audit_log import AuditLog
from server.usecases.auto_rotation import MIN_PERIOD_SECONDS, AutoRotation
from server.usecases.backups import Backups
from server.usecases.data_keys import DEFAULT_RETRY_WINDOW_SECONDS, DataKeys
from server.usecases.keys import KeyVersions
from server.usecases.lifecycle import Lifecycle
from server.usecases.materials import KeyMaterials
from server.usecases.recovery import BindingRecovery
from server.usecases.retire import Retirement
from server.usecases.scheduler import Scheduler
from server.usecases.transactions import Transactions, now_us


class KeyManagementService:
    def __init__(
        self,
        engine: Engine,
        root_key: crypto.RootKeyring | crypto.RootKey,
        *,
        on_unavailable: Callable[[], None] | None = None,
        audit_sink: AuditSink | None = None,
        material_cache_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        data_key_retry_window_seconds: float = DEFAULT_RETRY_WINDOW_SECONDS,
        destroy_delay_seconds: float = 0.0,
        destroy_approvals: Callable[[], int] = lambda: 1,
        min_rotation_seconds: int = MIN_PERIOD_SECONDS,
        max_data_keys_per_version: int = model.DEFAULT_MAX_DATA_KEYS_PER_VERSION,
    ) -> None:
        # A lone RootKey is a keyring of one (tests, tools).
        self._root_key = crypto.as_keyring(root_key)
        self._audit_sink = audit_sink
        self._server_keys: ServerKeys | None = None
        self.transactions = Transactions(engine, on_unavailable)
        self.materials = KeyMaterials(engine, self._root_key, material_cache_seconds)
        # Dev mode is what allows rotation periods of seconds; it also looks for due work
        # more often.
        self.scheduler = Scheduler(self.transactions, dev=min_rotation_seconds == 0)
        wake = self.scheduler.wake
        self.auto_rotation = AutoRotation(
            self.transactions, self.materials, wake, min_period_seconds=min_rotation_seconds
        )
        bound = max_data_keys_per_version
        self.keys = KeyVersions(self.transactions, self.materials)
        self.data_keys = DataKeys(
            self.transactions,
            self.materials,
            BindingRecovery(self.transactions, self.materials),
            lambda key_name, wanted: self.auto_rotation.rotate_for_use(key_name, wanted, bound),
            retry_window_seconds=data_key_retry_window_seconds,
            max_data_keys_per_version=bound,
        )
        self.audit = AuditLog(self.transactions, lambda: self.server_keys)
        self.lifecycle = Lifecycle(
            self.transactions, self.materials, wake, destroy_delay_seconds, destroy_approvals
        )
        self.backups = Backups(self.transactions)
        self.retirement = Retirement(self.transactions, self.materials, self.auto_rotation, bound)
        self.scheduler.add_pass(self.lifecycle.carry_out_due)
        self.scheduler.add_pass(self.auto_rotation.rotate_due_keys)

    def check_root_key(self) -> None:
        """Refuses a root keyring the database does not know, then unwraps (on first start,
        makes) the server's audit and state keys; every use case needs them."""
        keys = server_keys.open_or_create(
            self.transactions.sessions, self._root_key, self._audit_sink, now_us
        )
        self._server_keys = keys
        self.transactions.open(keys.integrity(self._audit_sink))

    @property
    def server_keys(self) -> ServerKeys:
        if self._server_keys is None:
            raise RuntimeError("check_root_key() must run before the service is used")
        return self._server_keys

    def close(self) -> None:
        """Stops the scheduler and the group committer once in-flight calls are done, then
        wipes cached material."""
        self.scheduler.stop()
        self.data_keys.close()
        self.materials.close()
