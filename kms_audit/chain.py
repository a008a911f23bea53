"""The public hash chain: each event's hash covers the previous hash and its own fields."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

GENESIS_HASH = "0" * 64

# The fields a hash covers, in a fixed order: adding one is a format change.
HASHED_FIELDS = (
    "sequence",
    "time_us",
    "actor",
    "action",
    "outcome",
    "status_code",
    "key_name",
    "version",
    "from_version",
    "to_version",
    "backup_id",
    "reason",
    "detail",
)

# One encoder for every event: json.dumps with options builds a new one per call.
_CANONICAL_JSON = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def event_hash(previous_hash: str, fields: Mapping[str, object]) -> str:
    canonical = _CANONICAL_JSON.encode([previous_hash, *(fields[name] for name in HASHED_FIELDS)])
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
