"""Format version 2 segments: sealed (and optionally zstd-compressed) on worker threads.

Every segment is a record `flags ‖ stored length ‖ plaintext length ‖ ciphertext ‖ tag`
under a key derived from the data key and the header's salt (docs/archive-format.md).
Writer and reader keep a few segments in flight, so memory stays flat whatever the size.
"""

from __future__ import annotations

import collections
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from client.archive import v1
from client.archive.header import (
    DATA_KEY_SIZE,
    TAG_SIZE,
    ArchiveError,
    ArchiveHeader,
    Compression,
    HeaderError,
    ParsedHeader,
    PayloadError,
    SegmentError,
    TrailingDataError,
    TruncatedError,
)

RECORD = struct.Struct(">BII")  # flags, stored length, plaintext length
FLAG_LAST = 0x01
FLAG_ZSTD = 0x02
_KNOWN_FLAGS = FLAG_LAST | FLAG_ZSTD
_SEGMENT_AAD = struct.Struct(">32sQBI")  # header digest, segment number, flags, plaintext length
HKDF_INFO = b"kms-backup archive v2 segment key"


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class SupportsReadinto(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def _worker_count() -> int:
    """Threads sealing or opening segments: AES-GCM and zstd release the GIL (max 4)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def segment_key(data_key: bytes, salt: bytes) -> bytes:
    """HKDF-SHA256 of the data key with the header's random salt: a fresh key per archive."""
    if len(data_key) != DATA_KEY_SIZE:
        raise ArchiveError(f"data key must be {DATA_KEY_SIZE} bytes, got {len(data_key)}")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=HKDF_INFO)
    return hkdf.derive(data_key)


def _write_all(dest: Writable, data: bytes | memoryview) -> None:
    """Write every byte: a raw (unbuffered) file may accept only part of a large write."""
    view = memoryview(data)
    while view:
        written = dest.write(view)  # type: ignore[arg-type]
        if not isinstance(written, int) or written >= len(view):
            return
        if written <= 0:
            raise OSError("the archive output accepted no bytes")
        view = view[written:]


class _Compressors(threading.local):
    """One zstd compressor per worker thread (they are not thread-safe)."""

    def __init__(self) -> None:
        self.by_level: dict[int, object] = {}


def parse_compression(text: str) -> tuple[Compression, int]:
    """`none`, `zstd` or `zstd:LEVEL` (1..22) from the command line."""
    if text == "none":
        return Compression.NONE, 0
    name, _, level = text.partition(":")
    if name != "zstd":
        raise ValueError(f"--compression {text}: expected none, zstd or zstd:LEVEL")
    if not level:
        return Compression.ZSTD, DEFAULT_ZSTD_LEVEL
    if not level.isdigit() or not 1 <= int(level) <= 22:
        raise ValueError(f"--compression {text}: the zstd level must be 1..22")
    return Compression.ZSTD, int(level)


# zstd gives up on incompressible input quickly at this level (about 4 GB/s per core here),
# so it stays on for every backup; text shrinks about as much as `zstd -3`.
DEFAULT_ZSTD_LEVEL = 3


class ArchiveWriter:
    """A write-only file object that seals what is written into version 2 segments.

    Call `close()` (or use it as a context manager) to seal the last segment; an
    archive that is not closed reads as truncated, never as complete. Segments are
    compressed and sealed on worker threads and written to `dest` in order.
    """

    def __init__(self, dest: Writable, header: ArchiveHeader, data_key: bytes) -> None:
        if header.version != 2:
            raise ValueError("only format version 2 is written")
        self._aead = AESGCM(segment_key(data_key, header.salt))
        self._level = header.compression_level if header.compression is Compression.ZSTD else 0
        self._size = header.segment_size
        raw = header.encode()
        self._digest = hashlib.sha256(raw).digest()
        self._dest = dest
        _write_all(dest, raw + self._aead.encrypt(v1.HEADER_NONCE, b"", raw))
        self._compressors = _Compressors()
        self._executor: ThreadPoolExecutor | None = None
        self._depth = _worker_count() + 2
        self._pending: collections.deque[Future[bytes]] = collections.deque()
        self._buffer = bytearray(self._size)
        self._fill = 0
        self._segment = 0
        self._closed = False
        self.plaintext_bytes = 0
        self.stored_bytes = len(raw) + TAG_SIZE

    def _seal(self, segment: int, data: bytearray | bytes, length: int, last: bool) -> bytes:
        plaintext: bytes | memoryview = memoryview(data)[:length]
        flags = FLAG_LAST if last else 0
        if self._level and length:
            compressor = self._compressors.by_level.get(self._level)
            if compressor is None:
                import zstandard

                compressor = zstandard.ZstdCompressor(level=self._level, write_checksum=False)
                self._compressors.by_level[self._level] = compressor
            packed = compressor.compress(plaintext)  # type: ignore[attr-defined]
            if len(packed) < length:  # stored raw when it does not shrink
                plaintext, flags = packed, flags | FLAG_ZSTD
        aad = _SEGMENT_AAD.pack(self._digest, segment, flags, length)
        nonce = v1.segment_nonce(segment)
        sealed = self._aead.encrypt(nonce, plaintext, aad)
        return RECORD.pack(flags, len(sealed) - TAG_SIZE, length) + sealed

    def _submit(self, data: bytearray, length: int, last: bool) -> None:
        segment = self._segment
        self._segment += 1
        if last and not self._pending:
            self._emit(self._seal(segment, data, length, last))  # no thread for one segment
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(_worker_count(), thread_name_prefix="archive")
        self._pending.append(self._executor.submit(self._seal, segment, data, length, last))
        while len(self._pending) > (0 if last else self._depth):
            self._emit(self._pending.popleft().result())

    def _emit(self, record: bytes) -> None:
        _write_all(self._dest, record)
        self.stored_bytes += len(record)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed archive")
        view = memoryview(data).cast("B")
        taken = 0
        while taken < len(view):
            # Keep a full segment back: only close() knows whether it is the last one.
            if self._fill == self._size:
                self._submit(self._buffer, self._fill, last=False)
                self._buffer, self._fill = bytearray(self._size), 0
            count = min(self._size - self._fill, len(view) - taken)
            self._buffer[self._fill : self._fill + count] = view[taken : taken + count]
            self._fill += count
            taken += count
        self.plaintext_bytes += taken
        return taken

    def readfrom(self, source: SupportsReadinto, limit: int = -1) -> int:
        """Read `source` (to its end, or `limit` bytes) straight into segment buffers."""
        if self._closed:
            raise ValueError("write to a closed archive")
        total = 0
        while limit < 0 or total < limit:
            room = (self._size - self._fill) or self._size
            if limit >= 0:
                room = min(room, limit - total)
            if self._fill < self._size:
                count = source.readinto(memoryview(self._buffer)[self._fill : self._fill + room])
                if not count:
                    break
                self._fill += count
            else:
                # Only a read past the full segment tells whether it is the last one.
                spare = bytearray(self._size)
                count = source.readinto(memoryview(spare)[:room])
                if not count:
                    break
                self._submit(self._buffer, self._fill, last=False)
                self._buffer, self._fill = spare, count
            total += count
        self.plaintext_bytes += total
        return total

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._submit(self._buffer, self._fill, last=True)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

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
            self._shutdown()


def _read_into(stream: BinaryIO, buffer: memoryview) -> int:
    """Fill `buffer`, less only at end of input (pipes return short reads)."""
    filled = 0
    while filled < len(buffer):
        count = stream.readinto(buffer[filled:]) or 0  # type: ignore[attr-defined]
        if not count:
            break
        filled += count
    return filled


def _iter_v2(stream: BinaryIO, parsed: ParsedHeader, data_key: bytes) -> Iterator[bytes]:
    header = parsed.header
    aead = AESGCM(segment_key(data_key, header.salt))
    digest = v1.authenticate_header(parsed, aead)
    size = header.segment_size
    decompressors = _Compressors()

    def open_segment(segment: int, flags: int, length: int, sealed: bytearray) -> bytes:
        aad = _SEGMENT_AAD.pack(digest, segment, flags, length)
        try:
            plaintext = aead.decrypt(v1.segment_nonce(segment), sealed, aad)
        except InvalidTag:
            raise SegmentError(
                segment,
                f"segment {segment} failed authentication: it was modified, truncated, "
                "reordered or comes from another archive",
            ) from None
        if flags & FLAG_ZSTD:
            import zstandard

            decompressor = decompressors.by_level.get(0)
            if decompressor is None:
                decompressor = zstandard.ZstdDecompressor()
                decompressors.by_level[0] = decompressor
            try:
                plaintext = decompressor.decompress(  # type: ignore[attr-defined]
                    plaintext, max_output_size=length
                )
            except zstandard.ZstdError as exc:
                raise PayloadError(f"segment {segment} does not decompress: {exc}") from None
            if len(plaintext) != length:
                raise PayloadError(f"segment {segment} decompresses to the wrong length")
        return plaintext

    def next_record(segment: int) -> tuple[int, int, bytearray] | None:
        """Read one record; None at end of input. Lengths are checked before any work."""
        prefix = bytearray(RECORD.size)
        got = _read_into(stream, memoryview(prefix))
        if got == 0:
            return None
        if got < RECORD.size:
            raise TruncatedError(f"archive truncated inside segment {segment}")
        flags, stored, length = RECORD.unpack(prefix)
        if flags & ~_KNOWN_FLAGS:
            raise SegmentError(segment, f"segment {segment} has unknown flags 0x{flags:02x}")
        if length > size or (not flags & FLAG_LAST and length != size):
            raise SegmentError(
                segment, f"segment {segment} claims {length} bytes (segment size {size})"
            )
        if (flags & FLAG_ZSTD and not 0 < stored < length) or (
            not flags & FLAG_ZSTD and stored != length
        ):
            raise SegmentError(segment, f"segment {segment} has an impossible stored length")
        sealed = bytearray(stored + TAG_SIZE)
        if _read_into(stream, memoryview(sealed)) < len(sealed):
            raise TruncatedError(f"archive truncated inside segment {segment}")
        return flags, length, sealed

    executor: ThreadPoolExecutor | None = None
    pending: collections.deque[tuple[Future[bytes], bool]] = collections.deque()
    depth = _worker_count() + 1
    segment = 0
    ended = False
    deferred: ArchiveError | None = None  # raised once the segments before it are out
    try:
        while True:
            while not ended and len(pending) < depth:
                try:
                    record = next_record(segment)
                except ArchiveError as exc:
                    deferred, ended = exc, True
                    break
                if record is None:
                    deferred = TruncatedError(
                        f"archive truncated: it ends after segment {segment - 1} "
                        "without a last segment"
                        if segment
                        else "archive truncated: no segments after the header"
                    )
                    ended = True
                    break
                flags, length, sealed = record
                ended = bool(flags & FLAG_LAST)
                if executor is None and not (ended and segment == 0):
                    executor = ThreadPoolExecutor(_worker_count(), thread_name_prefix="archive")
                if executor is None:
                    done: Future[bytes] = Future()
                    done.set_result(open_segment(segment, flags, length, sealed))
                    pending.append((done, ended))
                else:
                    job = executor.submit(open_segment, segment, flags, length, sealed)
                    pending.append((job, ended))
                segment += 1
            if not pending:
                if deferred is not None:
                    raise deferred
                return
            future, last = pending.popleft()
            plaintext = future.result()
            if last and stream.read(1):
                raise TrailingDataError(f"unexpected data after the last segment ({segment - 1})")
            yield plaintext
    finally:
        for future, _ in pending:
            future.cancel()
        if executor is not None:
            executor.shutdown(wait=True)


def iter_segments(stream: BinaryIO, parsed: ParsedHeader, data_key: bytes) -> Iterator[bytes]:
    """Each segment's plaintext, in order, once its tag verified.

    Raises an `ArchiveError` naming what failed; everything yielded so far stays
    unverified as a whole until the iterator is exhausted (the archive may be cut short).
    """
    if len(data_key) != DATA_KEY_SIZE:
        raise ArchiveError(f"data key must be {DATA_KEY_SIZE} bytes, got {len(data_key)}")
    if parsed.header.version == 1:
        return v1.iter_segments(stream, parsed, data_key)
    if parsed.header.version == 2:
        return _iter_v2(stream, parsed, data_key)
    raise HeaderError(f"format version {parsed.header.version} cannot be read")


class PlaintextReader:
    """A read-only file object over the verified segments of an archive.

    `read` and `readview` return only verified plaintext; end of input is reported
    only once the last segment verified. `on_segment` sees each segment's size.
    """

    def __init__(
        self,
        segments: Iterator[bytes],
        on_segment: Callable[[int], None] | None = None,
    ) -> None:
        self._segments = segments
        self._current = memoryview(b"")
        self._done = False
        self._on_segment = on_segment
        self.plaintext_bytes = 0

    def readview(self, limit: int = -1) -> memoryview:
        """Up to `limit` bytes of the current segment without copying; empty at the end."""
        while not self._current and not self._done:
            try:
                segment = next(self._segments)
            except StopIteration:
                self._done = True
                break
            self._current = memoryview(segment)
            self.plaintext_bytes += len(segment)
            if self._on_segment is not None:
                self._on_segment(len(segment))
        count = len(self._current) if limit < 0 else min(limit, len(self._current))
        view = self._current[:count]
        self._current = self._current[count:]
        return view

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(bytes(v) for v in iter(self.readview, memoryview(b"")))
        parts: list[memoryview] = []
        wanted = size
        while wanted:
            view = self.readview(wanted)
            if not view:
                break
            parts.append(view)
            wanted -= len(view)
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def readinto(self, buffer: memoryview) -> int:
        view = self.readview(len(buffer))
        buffer[: len(view)] = view
        return len(view)

    def drain(self) -> None:
        """Verify every remaining segment, keeping nothing."""
        while self.readview():
            pass

    def close(self) -> None:
        close = getattr(self._segments, "close", None)
        if close is not None:
            close()
