"""Signed checkpoints: the server's Ed25519 signature over (sequence, chain hash, time).

An auditor who keeps checkpoints outside the database can later prove that the log
still extends them: the same hash at the same sequence. Deleting or rewriting events
up to a kept checkpoint cannot go unnoticed, even by someone who holds the database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

CHECKPOINT_FORMAT = "kms-audit-checkpoint/1"


class CheckpointError(Exception):
    """A checkpoint that does not parse, or whose signature does not hold."""


@dataclass(frozen=True)
class Checkpoint:
    sequence: int
    chain_hash: str
    time_us: int
    key_id: str
    signature: str  # base64 of the Ed25519 signature over `signed_bytes`

    def signed_bytes(self) -> bytes:
        return signed_payload(self.sequence, self.chain_hash, self.time_us, self.key_id)

    def to_json(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, value: object) -> Checkpoint:
        if not isinstance(value, dict) or value.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"not a checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        try:
            checkpoint = cls(
                sequence=value["sequence"],
                chain_hash=value["chain_hash"],
                time_us=value["time_us"],
                key_id=value["key_id"],
                signature=value["signature"],
            )
        except KeyError as missing:
            raise CheckpointError(f"the checkpoint has no {missing.args[0]!r} field") from None
        types_ok = (
            _is_count(checkpoint.sequence)
            and _is_count(checkpoint.time_us)
            and all(
                isinstance(text, str)
                for text in (checkpoint.chain_hash, checkpoint.key_id, checkpoint.signature)
            )
        )
        if not types_ok:
            raise CheckpointError("the checkpoint's fields have the wrong types")
        return checkpoint


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def signed_payload(sequence: int, chain_hash: str, time_us: int, key_id: str) -> bytes:
    canonical = json.dumps(
        [CHECKPOINT_FORMAT, sequence, chain_hash, time_us, key_id],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return canonical.encode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name for a signing key: the start of the SHA-256 of its raw public bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise CheckpointError("the public key is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CheckpointError("the public key is not an Ed25519 key")
    return key


def sign(
    private_key: Ed25519PrivateKey, sequence: int, chain_hash: str, time_us: int
) -> Checkpoint:
    kid = key_id(private_key.public_key())
    signature = private_key.sign(signed_payload(sequence, chain_hash, time_us, kid))
    return Checkpoint(sequence, chain_hash, time_us, kid, base64.b64encode(signature).decode())


def verify(public_key: Ed25519PublicKey, checkpoint: Checkpoint, what: str = "checkpoint") -> None:
    """Raises `CheckpointError` unless `public_key` signed `checkpoint`."""
    expected_id = key_id(public_key)
    if checkpoint.key_id != expected_id:
        raise CheckpointError(
            f"the {what} was signed by key {checkpoint.key_id}, not by the public key given "
            f"({expected_id}): it comes from another server"
        )
    try:
        signature = base64.b64decode(checkpoint.signature, validate=True)
        public_key.verify(signature, checkpoint.signed_bytes())
    except (InvalidSignature, binascii.Error, ValueError):
        raise CheckpointError(
            f"the {what}'s signature does not verify: it was altered after it was signed"
        ) from None
