"""The encrypted backup archive: a header, then AES-256-GCM sealed segments.

The byte layout is specified in docs/archive-format.md. Encryption and
decryption both stream: memory use is a couple of segments, whatever the
size of the payload.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"KMSBKUP\x00"
FORMAT_VERSION = 1
DEFAULT_SEGMENT_SIZE = 1 << 20
# A reader holds two segments in memory, so the header may not ask for more.
MAX_SEGMENT_SIZE = 64 << 20
MAX_HEADER_BODY = 64 << 10
DATA_KEY_SIZE = 32
TAG_SIZE = 16

_PREAMBLE = struct.Struct(">8sHI")  # magic, format version, header body length
_FIXED_BODY = struct.Struct(">BIqI")  # payload kind, segment size, create time, key version
_SEGMENT_AAD = struct.Struct(">32sQB")  # header digest, segment number, last-segment flag
# Header and segment nonces live in disjoint spaces, so neither can ever repeat the other.
_HEADER_NONCE = b"HDR\x00" + bytes(8)
_SEGMENT_NONCE_PREFIX = bytes(4)


class PayloadKind(enum.IntEnum):
    """What the decrypted payload is, so restore knows how to materialise it."""

    FILE = 1  # the bytes of one regular file
    TREE = 2  # a tar stream of a directory tree, rooted at "."
    STREAM = 3  # bytes read from a pipe (stdin)


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

    def encode(self) -> bytes:
        """The header bytes exactly as they are written (preamble included)."""
        if not 1 <= self.segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(f"segment size must be 1..{MAX_SEGMENT_SIZE} bytes")
        body = _FIXED_BODY.pack(
            self.payload_kind, self.segment_size, self.create_time, self.key_version
        )
        for value in (
            self.backup_id.encode(),
            self.key_name.encode(),
            self.wrapped_data_key,
        ):
            if len(value) > 0xFFFF:
                raise ValueError("header field longer than 65535 bytes")
            body += struct.pack(">H", len(value)) + value
        return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(body)) + body


@dataclass(frozen=True)
class ParsedHeader:
    """A header read from an archive, with its raw bytes and authentication tag."""

    header: ArchiveHeader
    raw: bytes
    tag: bytes


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
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


def _check_data_key(data_key: bytes) -> AESGCM:
    if len(data_key) != DATA_KEY_SIZE:
        raise ArchiveError(f"data key must be {DATA_KEY_SIZE} bytes, got {len(data_key)}")
    return AESGCM(data_key)


def _segment_nonce(segment: int) -> bytes:
    return _SEGMENT_NONCE_PREFIX + segment.to_bytes(8, "big")


def read_header(stream: BinaryIO) -> ParsedHeader:
    """Parse the header; it is authenticated later by `ArchiveReader`, once the key is known."""
    preamble = _read_exactly(stream, _PREAMBLE.size)
    if len(preamble) < len(MAGIC) or preamble[: len(MAGIC)] != MAGIC:
        raise NotAnArchiveError("not a backup archive (bad magic value)")
    if len(preamble) < _PREAMBLE.size:
        raise HeaderError("archive truncated inside its header")
    _, version, body_length = _PREAMBLE.unpack(preamble)
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"archive format version {version} is not supported "
            f"(this reader knows {FORMAT_VERSION})"
        )
    if body_length > MAX_HEADER_BODY:
        raise HeaderError(f"header length {body_length} exceeds {MAX_HEADER_BODY} bytes")
    body = _read_exactly(stream, body_length)
    tag = _read_exactly(stream, TAG_SIZE)
    if len(body) < body_length or len(tag) < TAG_SIZE:
        raise HeaderError("archive truncated inside its header")
    try:
        kind, segment_size, create_time, key_version = _FIXED_BODY.unpack_from(body)
        offset = _FIXED_BODY.size
        fields: list[bytes] = []
        for _ in range(3):
            (length,) = struct.unpack_from(">H", body, offset)
            offset += 2
            if offset + length > len(body):
                raise HeaderError("header field runs past the end of the header")
            fields.append(body[offset : offset + length])
            offset += length
        if offset != len(body):
            raise HeaderError("unexpected bytes at the end of the header")
        header = ArchiveHeader(
            backup_id=fields[0].decode(),
            key_name=fields[1].decode(),
            key_version=key_version,
            wrapped_data_key=fields[2],
            payload_kind=PayloadKind(kind),
            segment_size=segment_size,
            create_time=create_time,
        )
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, HeaderError):
            raise
        raise HeaderError(f"malformed header: {exc}") from None
    if not 1 <= segment_size <= MAX_SEGMENT_SIZE:
        raise HeaderError(f"segment size {segment_size} is outside 1..{MAX_SEGMENT_SIZE}")
    return ParsedHeader(header=header, raw=preamble + body, tag=tag)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class ArchiveWriter:
    """A write-only file object that seals what is written into archive segments.

    Call `close()` (or use it as a context manager) to seal the last segment;
    an archive that is not closed reads as truncated, never as complete.
    """

    def __init__(self, dest: Writable, header: ArchiveHeader, data_key: bytes) -> None:
        self._aead = _check_data_key(data_key)
        self._dest = dest
        self._segment_size = header.segment_size
        raw = header.encode()
        self._header_digest = hashlib.sha256(raw).digest()
        dest.write(raw)
        dest.write(self._aead.encrypt(_HEADER_NONCE, b"", raw))
        self._buffer = bytearray()
        self._segment = 0
        self._closed = False
        self.plaintext_bytes = 0

    def _seal(self, plaintext: bytes | bytearray, last: bool) -> None:
        aad = _SEGMENT_AAD.pack(self._header_digest, self._segment, last)
        self._dest.write(self._aead.encrypt(_segment_nonce(self._segment), bytes(plaintext), aad))
        self._segment += 1

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed archive")
        self._buffer += data
        self.plaintext_bytes += len(data)
        # Keep a full segment back: only close() knows whether it is the last one.
        size = self._segment_size
        while len(self._buffer) > size:
            self._seal(self._buffer[:size], last=False)
            del self._buffer[:size]
        return len(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._seal(self._buffer, last=True)
        self._buffer = bytearray()

    @property
    def segments_written(self) -> int:
        return self._segment

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # A failed write must not end in a valid last segment.
        if exc_type is None:
            self.close()
        else:
            self._closed = True


def iter_plaintext(stream: BinaryIO, parsed: ParsedHeader, data_key: bytes) -> Iterator[bytes]:
    """Authenticate the header, then yield each segment's plaintext once it verified.

    Raises an `ArchiveError` subclass naming what failed; a caller must treat
    everything yielded so far as unverified until the iterator is exhausted.
    """
    aead = _check_data_key(data_key)
    try:
        aead.decrypt(_HEADER_NONCE, parsed.tag, parsed.raw)
    except InvalidTag:
        raise HeaderError(
            "header authentication failed: the header was tampered with "
            "or the data key is not this archive's"
        ) from None
    header_digest = hashlib.sha256(parsed.raw).digest()
    chunk_size = parsed.header.segment_size + TAG_SIZE

    def open_segment(segment: int, chunk: bytes, last: bool) -> bytes | None:
        aad = _SEGMENT_AAD.pack(header_digest, segment, last)
        try:
            return aead.decrypt(_segment_nonce(segment), chunk, aad)
        except InvalidTag:
            return None

    segment = 0
    chunk = _read_exactly(stream, chunk_size)
    while True:
        if not chunk:
            raise TruncatedError(
                f"archive truncated: it ends after segment {segment - 1} without a last segment"
                if segment
                else "archive truncated: no segments after the header"
            )
        if len(chunk) < TAG_SIZE:
            raise TruncatedError(f"archive truncated inside segment {segment}")
        # A full chunk may or may not be the last: look one chunk ahead to know.
        following = _read_exactly(stream, chunk_size) if len(chunk) == chunk_size else b""
        is_last = not following
        plaintext = open_segment(segment, chunk, last=is_last)
        if plaintext is None:
            if (
                is_last
                and len(chunk) == chunk_size
                and open_segment(segment, chunk, last=False) is not None
            ):
                raise TruncatedError(
                    f"archive truncated: it ends after segment {segment} without a last segment"
                )
            if not is_last and open_segment(segment, chunk, last=True) is not None:
                raise TrailingDataError(f"unexpected data after the last segment ({segment})")
            raise SegmentError(
                segment,
                f"segment {segment} failed authentication: it was modified, truncated, "
                "reordered or comes from another archive",
            )
        yield plaintext
        if is_last:
            return
        segment += 1
        chunk = following


def decrypt_to(stream: BinaryIO, parsed: ParsedHeader, data_key: bytes, out: Writable) -> int:
    """Decrypt every segment into `out`; returns the plaintext size."""
    total = 0
    for plaintext in iter_plaintext(stream, parsed, data_key):
        out.write(plaintext)
        total += len(plaintext)
    return total


def verify(stream: BinaryIO, parsed: ParsedHeader, data_key: bytes) -> int:
    """Check every segment without keeping any plaintext; returns the plaintext size."""
    return sum(len(p) for p in iter_plaintext(stream, parsed, data_key))


def copy_into(source: Readable, writer: ArchiveWriter, chunk_size: int) -> None:
    """Stream `source` into `writer` in bounded chunks."""
    while chunk := source.read(chunk_size):
        writer.write(chunk)
