"""Key-version material as the use cases get it: unwrapped from the root keyring, cached,
and forgotten when the version is destroyed."""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from server.db.engine import truncate_sqlite_wal
from server.db.repository import Repository
from server.domain.errors import IntegrityFailure
from server.keystore import crypto
from server.keystore.material_cache import MaterialCache
from server.usecases.guards import VersionLike, require_usable
from server.usecases.transactions import DATABASE_ERRORS

log = logging.getLogger(__name__)


class KeyMaterials:
    def __init__(self, engine: Engine, root_key: crypto.RootKeyring, cache_seconds: float) -> None:
        self._engine = engine
        self.root_key = root_key
        self._cache = MaterialCache(cache_seconds)
        self._cache.start_sweeping()

    def close(self) -> None:
        """Wipes every cached material."""
        self._cache.close()

    def of(self, row: VersionLike) -> bytearray:
        """A usable version's unwrapped material, from the cache when its wrapped blob is known
        (see server.keystore.material_cache for why that is safe)."""
        require_usable(row, f"{row.key_name} version {row.version} cannot be used")
        assert row.wrapped_material is not None
        material = self._cache.get(row.key_name, row.version, row.wrapped_material)
        if material is None:
            material = self.root_key.unwrap_version_material(
                row.key_name, row.version, row.wrapped_material
            )
            self._cache.put(row.key_name, row.version, row.wrapped_material, material)
        return material

    def of_version(self, repo: Repository, key_name: str, version: int) -> bytearray:
        """The material of a version a binding names (it must exist: bindings keep theirs)."""
        row = repo.get_version(key_name, version)
        if row is None:
            raise IntegrityFailure(
                "BINDING_WITHOUT_VERSION", f"{key_name} version {version} is missing"
            )
        return self.of(row)

    def new_wrapped(self, key_name: str, version: int, imported: bytes = b"") -> bytes:
        """New material for a version (or the imported one), wrapped under the root key; the
        plaintext is wiped before this returns."""
        material = bytearray(imported) if imported else crypto.new_secret_buffer()
        try:
            return self.root_key.wrap_version_material(key_name, version, material)
        finally:
            crypto.wipe(material)

    def forget_destroyed(self, key_name: str, version: int) -> None:
        """After a destroy commits: no copy of the material in this process's cache, and on
        SQLite none in the write-ahead log (other replicas' caches expire on their own)."""
        self._cache.evict(key_name, version)
        if self._engine.dialect.name != "sqlite":
            return
        try:
            done = truncate_sqlite_wal(self._engine)
        except DATABASE_ERRORS as error:
            log.warning("could not truncate the SQLite WAL after a destroy: %s", error)
            return
        if not done:
            log.warning(
                "the SQLite WAL could not be truncated after destroying %s version %d "
                "(readers kept it busy); it will be at the next checkpoint",
                key_name,
                version,
            )
