"""The archive header (format versions 1 and 2) and the errors every reader raises.

The byte layout is specified in docs/archive-format.md.
"""

from __future__ import annotations

import enum
import os
import struct
import time
from dataclasses import dataclass, field
from typing import BinaryIO

MAGIC = b"KMSBKUP\x00"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
DEFAULT_SEGMENT_SIZE = 1 << 20
# A reader holds a few segments in memory, so the header may not ask for more.
MAX_SEGMENT_SIZE = 64 << 20
MAX_HEADER_BODY = 64 << 10
DATA_KEY_SIZE = 32
SALT_SIZE = 32
TAG_SIZE = 16

PREAMBLE = struct.Struct(">8sHI")  # magic, format version, header body length
V1_FIXED_BODY = struct.Struct(">BIqI")  # kind, segment size, create time, key version
# kind, compression, compression level, segment size, create time, key version, salt
V2_FIXED_BODY = struct.Struct(f">BBbIqI{SALT_SIZE}s")


class PayloadKind(enum.IntEnum):
    """What the decrypted payload is, so restore knows how to materialise it."""

    FILE = 1  # one regular file (v1: its bytes; v2: one entry of the tree encoding)
    TREE = 2  # a directory tree (v1: a tar rooted at "."; v2: the tree encoding)
    STREAM = 3  # bytes read from a pipe (stdin)


class Compression(enum.IntEnum):
    """What the writer asked for; each segment's own flag says whether it is compressed."""

    NONE = 0
    ZSTD = 1


class ArchiveError(Exception):
    """The archive is malformed, tampered with, truncated or not decryptable."""


class NotAnArchiveError(ArchiveError):
    """The input does not start with the archive magic value."""


class UnsupportedVersionError(ArchiveError):
    """The archive was written in a format version this reader does not know."""


class HeaderError(ArchiveError):
    """The header is truncated, malformed or fails authentication."""


class SegmentError(ArchiveError):
    """A segment fails authentication: it was modified, moved or comes from elsewhere."""

    def __init__(self, segment: int, message: str) -> None:
        super().__init__(message)
        self.segment = segment


class TruncatedError(ArchiveError):
    """The archive ends before its last segment."""


class TrailingDataError(ArchiveError):
    """Bytes follow the last segment."""


class PayloadError(ArchiveError):
    """The verified payload does not follow its encoding (a writer bug or a forged archive)."""


@dataclass(frozen=True)
class ArchiveHeader:
    """Everything an archive says about itself before its first segment."""

    backup_id: str
    key_name: str
    key_version: int
    wrapped_data_key: bytes
    payload_kind: PayloadKind
    segment_size: int = DEFAULT_SEGMENT_SIZE
    create_time: int = field(default_factory=lambda: int(time.time()))
    version: int = FORMAT_VERSION
    compression: Compression = Compression.ZSTD
    compression_level: int = 3
    salt: bytes = field(default_factory=lambda: os.urandom(SALT_SIZE))

    def encode(self) -> bytes:
        """The header bytes exactly as they are written (preamble included, tag excluded)."""
        if not 1 <= self.segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(f"segment size must be 1..{MAX_SEGMENT_SIZE} bytes")
        if self.version == 1:
            body = V1_FIXED_BODY.pack(
                self.payload_kind, self.segment_size, self.create_time, self.key_version
            )
        elif self.version == 2:
            if len(self.salt) != SALT_SIZE:
                raise ValueError(f"the salt must be {SALT_SIZE} bytes")
            body = V2_FIXED_BODY.pack(
                self.payload_kind,
                self.compression,
                self.compression_level,
                self.segment_size,
                self.create_time,
                self.key_version,
                self.salt,
            )
        else:
            raise ValueError(f"cannot write format version {self.version}")
        for value in (self.backup_id.encode(), self.key_name.encode(), self.wrapped_data_key):
            if len(value) > 0xFFFF:
                raise ValueError("header field longer than 65535 bytes")
            body += struct.pack(">H", len(value)) + value
        return PREAMBLE.pack(MAGIC, self.version, len(body)) + body

    @property
    def compression_label(self) -> str:
        if self.version == 1 or self.compression is Compression.NONE:
            return "none"
        return f"zstd:{self.compression_level}"


@dataclass(frozen=True)
class ParsedHeader:
    """A header read from an archive, with its raw bytes and authentication tag."""

    header: ArchiveHeader
    raw: bytes
    tag: bytes


def read_exactly(stream: BinaryIO, size: int) -> bytes:
    """Read `size` bytes, fewer only at end of input (pipes return short reads)."""
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_header(stream: BinaryIO) -> ParsedHeader:
    """Parse the header; it is authenticated later, once the data key is known."""
    preamble = read_exactly(stream, PREAMBLE.size)
    if len(preamble) < len(MAGIC) or preamble[: len(MAGIC)] != MAGIC:
        raise NotAnArchiveError("not a backup archive (bad magic value)")
    if len(preamble) < PREAMBLE.size:
        raise HeaderError("archive truncated inside its header")
    _, version, body_length = PREAMBLE.unpack(preamble)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"archive format version {version} is not supported "
            f"(this reader knows {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    if body_length > MAX_HEADER_BODY:
        raise HeaderError(f"header length {body_length} exceeds {MAX_HEADER_BODY} bytes")
    body = read_exactly(stream, body_length)
    tag = read_exactly(stream, TAG_SIZE)
    if len(body) < body_length or len(tag) < TAG_SIZE:
        raise HeaderError("archive truncated inside its header")
    header = _parse_body(version, body)
    if not 1 <= header.segment_size <= MAX_SEGMENT_SIZE:
        raise HeaderError(f"segment size {header.segment_size} is outside 1..{MAX_SEGMENT_SIZE}")
    return ParsedHeader(header=header, raw=preamble + body, tag=tag)


def _parse_body(version: int, body: bytes) -> ArchiveHeader:
    fixed = V1_FIXED_BODY if version == 1 else V2_FIXED_BODY
    if len(body) < fixed.size:
        raise HeaderError("malformed header: shorter than its fixed fields")
    extra: dict[str, object] = {}
    if version == 1:
        kind, segment_size, create_time, key_version = fixed.unpack_from(body)
        extra = {"compression": Compression.NONE, "compression_level": 0}
    else:
        kind, compression, level, segment_size, create_time, key_version, salt = fixed.unpack_from(
            body
        )
        try:
            extra = {"compression": Compression(compression), "compression_level": level}
        except ValueError:
            raise HeaderError(f"malformed header: unknown compression {compression}") from None
        extra["salt"] = salt
    offset = fixed.size
    fields: list[bytes] = []
    for name in ("backup id", "key name", "wrapped data key"):
        if offset + 2 > len(body):
            raise HeaderError(f"malformed header: the {name} is missing")
        (length,) = struct.unpack_from(">H", body, offset)
        offset += 2
        if offset + length > len(body):
            raise HeaderError(f"malformed header: the {name} runs past the end of the header")
        fields.append(body[offset : offset + length])
        offset += length
    if offset != len(body):
        raise HeaderError("malformed header: unexpected bytes at the end of the header")
    try:
        kind = PayloadKind(kind)
        backup_id, key_name = fields[0].decode(), fields[1].decode()
    except ValueError as exc:  # UnicodeDecodeError is one
        raise HeaderError(f"malformed header: {exc}") from None
    return ArchiveHeader(
        backup_id=backup_id,
        key_name=key_name,
        key_version=key_version,
        wrapped_data_key=fields[2],
        payload_kind=kind,
        segment_size=segment_size,
        create_time=create_time,
        version=version,
        **extra,  # type: ignore[arg-type]
    )
