"""Reloading the policy file and the TLS certificates without a restart (SIGHUP).

Fail safe, not open: a file that cannot be read, parsed or validated (or a
policy with no principals) leaves what is in force untouched and logs an error.
Replace the policy file atomically: write a new file, then rename it over the
old. A new policy replaces the old one whole (readers never see half of one);
new certificates are served to connections
made after the reload, while established connections keep theirs.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.api.auth import PolicyHolder
from server.policy import Policy, PolicyError

log = logging.getLogger(__name__)


class TlsFilesError(Exception):
    """The certificate, key or client CA files cannot be used; the message says which."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None


class ReloadableTls:
    """Server credentials whose certificates can be swapped for new connections."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._pending: Any = None
        initial = self._load()
        self.credentials: grpc.ServerCredentials = grpc.dynamic_ssl_server_credentials(
            initial, self._fetch, require_client_authentication=files.client_ca is not None
        )

    def reload(self) -> None:
        """Reads the files again; raises TlsFilesError (changing nothing) if they are unusable."""
        configuration = self._load()
        with self._lock:
            self._pending = configuration

    def _fetch(self) -> Any:
        # Called by gRPC before each new handshake: a new configuration once, else None (keep).
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration

    def _load(self) -> Any:
        files = self._files
        try:
            chain, key = files.cert.read_bytes(), files.key.read_bytes()
            client_ca = files.client_ca.read_bytes() if files.client_ca else None
        except OSError as error:
            raise TlsFilesError(f"cannot read {error.filename}: {error.strerror}") from None
        _check_pair(chain, key, files)
        if client_ca is not None:
            try:
                x509.load_pem_x509_certificates(client_ca)
            except ValueError:
                raise TlsFilesError(f"{files.client_ca} holds no PEM certificate") from None
        return grpc.ssl_server_certificate_configuration(
            [(key, chain)], root_certificates=client_ca
        )


def _check_pair(chain: bytes, key: bytes, files: TlsFiles) -> None:
    """The first certificate of the chain must belong to the private key."""
    try:
        certificate = x509.load_pem_x509_certificates(chain)[0]
    except (ValueError, IndexError):
        raise TlsFilesError(f"{files.cert} holds no PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise TlsFilesError(f"{files.key} holds no unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if certificate.public_key().public_bytes(
        encoding, public
    ) != private_key.public_key().public_bytes(encoding, public):
        raise TlsFilesError(f"{files.cert} does not belong to the private key in {files.key}")


def reload_policy(holder: PolicyHolder, path: Path) -> bool:
    """Swaps in the policy file's current contents; keeps the old policy if anything is wrong.

    Never raises: this runs in the main thread of every server process, so an escaping
    error would end them all on one bad SIGHUP.
    """
    try:
        policy = Policy.load(path)
        if not policy.principals:
            # Most likely a file caught empty mid-write; either way it would lock everyone out.
            raise PolicyError(f"{path} defines no principals, which would refuse every call")
    except PolicyError as error:
        log.error("policy not reloaded, the previous policy stays in force: %s", error)
        return False
    except Exception as error:  # a bug in the parser: still fail safe, and say so
        log.error(
            "policy not reloaded, the previous policy stays in force: unexpected %s",
            type(error).__name__,
            exc_info=True,
        )
        return False
    holder.policy = policy
    log.info("policy reloaded from %s: %d principals", path, len(policy.principals))
    return True


def reload_tls(tls: ReloadableTls) -> bool:
    try:
        tls.reload()
    except TlsFilesError as error:
        log.error("certificates not reloaded, the previous ones stay in use: %s", error)
        return False
    except Exception as error:  # never let a reload end the process
        log.error(
            "certificates not reloaded, the previous ones stay in use: unexpected %s",
            type(error).__name__,
            exc_info=True,
        )
        return False
    log.info("TLS certificates reloaded; new connections get them")
    return True
