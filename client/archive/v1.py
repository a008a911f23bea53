"""Reading format version 1 archives (written before version 2); nothing writes them any more.

Version 1 seals segments under the data key itself and has no per-segment
length: every segment but the last is S + 16 bytes, and the last one is found
by reading one chunk ahead. See docs/archive-format.md.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from client.archive.header import (
    TAG_SIZE,
    ArchiveError,
    HeaderError,
    ParsedHeader,
    SegmentError,
    TrailingDataError,
    TruncatedError,
    read_exactly,
)

_SEGMENT_AAD = struct.Struct(">32sQB")  # header digest, segment number, last-segment flag
HEADER_NONCE = b"HDR\x00" + bytes(8)


def segment_nonce(segment: int) -> bytes:
    return bytes(4) + segment.to_bytes(8, "big")


def authenticate_header(parsed: ParsedHeader, aead: AESGCM) -> bytes:
    """Check the header tag under `aead`; returns the header digest."""
    try:
        aead.decrypt(HEADER_NONCE, parsed.tag, parsed.raw)
    except InvalidTag:
        raise HeaderError(
            "header authentication failed: the header was tampered with "
            "or the data key is not this archive's"
        ) from None
    return hashlib.sha256(parsed.raw).digest()


def _segment_failure(
    aead: AESGCM, header_digest: bytes, segment: int, chunk: bytes, last: bool, full: bool
) -> ArchiveError:
    """Why segment `segment` failed: tried with the other last flag, as the format says."""

    def opens(as_last: bool) -> bool:
        aad = _SEGMENT_AAD.pack(header_digest, segment, as_last)
        try:
            aead.decrypt(segment_nonce(segment), chunk, aad)
        except InvalidTag:
            return False
        return True

    if last and full and opens(as_last=False):
        return TruncatedError(
            f"archive truncated: it ends after segment {segment} without a last segment"
        )
    if not last and opens(as_last=True):
        return TrailingDataError(f"unexpected data after the last segment ({segment})")
    return SegmentError(
        segment,
        f"segment {segment} failed authentication: it was modified, truncated, "
        "reordered or comes from another archive",
    )


def iter_segments(stream: BinaryIO, parsed: ParsedHeader, data_key: bytes) -> Iterator[bytes]:
    """Authenticate the header, then yield each segment's plaintext once it verified."""
    aead = AESGCM(data_key)
    header_digest = authenticate_header(parsed, aead)
    chunk_size = parsed.header.segment_size + TAG_SIZE
    segment = 0
    chunk = read_exactly(stream, chunk_size)
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
        following = read_exactly(stream, chunk_size) if len(chunk) == chunk_size else b""
        is_last = not following
        aad = _SEGMENT_AAD.pack(header_digest, segment, is_last)
        try:
            plaintext = aead.decrypt(segment_nonce(segment), chunk, aad)
        except InvalidTag:
            full = len(chunk) == chunk_size
            raise _segment_failure(aead, header_digest, segment, chunk, is_last, full) from None
        yield plaintext
        if is_last:
            return
        segment += 1
        chunk = following
