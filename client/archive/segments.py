"""Format version 2 segments: sealed (and optionally zstd-compressed) on worker threads.

Every segment is a record `flags ‖ stored length ‖ plaintext length ‖ ciphertext ‖ tag`
under a key derived from the data key and the header's salt (docs/archive-format.md).
Writer and reader keep a few segments in flight, so memory stays flat whatever the size.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Protocol

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


DEFAULT_ZSTD_LEVEL = 3
# Before compressing a whole segment, a sample: when it does not shrink by 2 %, the segment
# (random, encrypted or already compressed data) is stored raw without the full attempt.
_SAMPLE = 32 << 10
_SAMPLE_GAIN = 0.98
# After this many raw segments in a row, only every _RETRY-th segment is even sampled, until
# one compresses again: incompressible input then costs about nothing extra.
_RAW_STREAK = 8
_RETRY = 16


class _Slot:
    """One segment's input and output buffers; writer and reader reuse a fixed set of them."""

    __slots__ = ("input", "output")

    def __init__(self, input_size: int, output_size: int) -> None:
        # Anonymous maps, not bytearrays (which are zeroed, so resident, at once): a page
        # counts in RSS only once used, and a compressed segment uses a third of its output.
        self.input = memoryview(mmap.mmap(-1, input_size))
        self.output = memoryview(mmap.mmap(-1, output_size))


class _Pool:
    """At most `count` slots, allocated on demand: a small archive needs one or two."""

    def __init__(self, count: int, input_size: int, output_size: int) -> None:
        self._left = count
        self._sizes = (input_size, output_size)
        self._free: list[_Slot] = []

    def take(self) -> _Slot | None:
        if self._free:
            return self._free.pop()
        if self._left:
            self._left -= 1
            return _Slot(*self._sizes)
        return None

    def give(self, slot: _Slot) -> None:
        self._free.append(slot)


def _compressor(cache: _Compressors, level: int) -> Any:
    compressor = cache.by_level.get(level)
    if compressor is None:
        import zstandard  # only archives that compress need it

        compressor = zstandard.ZstdCompressor(level=level, write_checksum=False)
        cache.by_level[level] = compressor
    return compressor


class ArchiveWriter:
    """A write-only file object that seals what is written into version 2 segments.

    Call `close()` (or use it as a context manager) to seal the last segment; an
    archive that is not closed reads as truncated, never as complete. Segments are
    compressed, sealed and written to `dest` on worker threads, in order (each worker
    waits for its segment's turn to write), from a fixed set of buffers: reading the
    next segments overlaps sealing and writing the earlier ones, and memory stays at a
    few segments.
    """

    def __init__(self, dest: Writable, header: ArchiveHeader, data_key: bytes) -> None:
        if header.version != 2:
            raise ValueError("only format version 2 is written")
        self._aead = AESGCM(segment_key(data_key, header.salt))
        self._level = header.compression_level if header.compression is Compression.ZSTD else 0
        self._size = size = header.segment_size
        raw = header.encode()
        self._digest = hashlib.sha256(raw).digest()
        self._dest = dest
        _write_all(dest, raw + self._aead.encrypt(v1.HEADER_NONCE, b"", raw))
        self._compressors = _Compressors()
        # Segments stored raw in a row; one to begin with, so the first segment is sampled on
        # this thread and random data never starts a worker.
        self._raw_streak = 1
        self._executor: ThreadPoolExecutor | None = None
        self._workers = _worker_count()
        # One slot filling, one per worker sealing or writing, one read ahead.
        self._pool = _Pool(self._workers + 2, size, RECORD.size + size + TAG_SIZE)
        # Guards the pool, the write turn and the first failure; workers and the caller wait on it.
        self._turn = threading.Condition()
        self._next_write = 0  # the segment whose record is written next
        self._failure: BaseException | None = None
        self._aborted = False
        self._slot = self._acquire()
        self._fill = 0
        self._segment = 0
        self._closed = False
        self.plaintext_bytes = 0
        self.stored_bytes = len(raw) + TAG_SIZE

    def _to_compress(self, segment: int, slot: _Slot, length: int) -> bool:
        """On the caller's thread: whether the segment is worth a full compression attempt.

        No sample while segments compress (it would only repeat what the last one said); after
        a run of raw ones, only every _RETRY-th segment is sampled at all.
        """
        if not self._level or not length:
            return False
        if self._raw_streak >= _RAW_STREAK and segment % _RETRY:
            return False
        if self._raw_streak == 0 or length <= _SAMPLE:
            return True
        sample = slot.input[:_SAMPLE]
        compressor = _compressor(self._compressors, self._level)
        if len(compressor.compress(sample)) < len(sample) * _SAMPLE_GAIN:
            return True
        self._raw_streak += 1
        return False

    def _seal(
        self, segment: int, slot: _Slot, length: int, last: bool, compress: bool
    ) -> memoryview:
        plaintext: bytes | memoryview = slot.input[:length]
        flags = FLAG_LAST if last else 0
        if compress:
            packed = _compressor(self._compressors, self._level).compress(plaintext)
            if len(packed) < length:  # stored raw when it does not shrink
                plaintext, flags = packed, flags | FLAG_ZSTD
            # Updated from several workers: an occasional lost update only shifts a retry.
            self._raw_streak = 0 if flags & FLAG_ZSTD else self._raw_streak + 1
        aad = _SEGMENT_AAD.pack(self._digest, segment, flags, length)
        stored = len(plaintext)
        record = slot.output[: RECORD.size + stored + TAG_SIZE]
        RECORD.pack_into(record, 0, flags, stored, length)
        self._aead.encrypt_into(v1.segment_nonce(segment), plaintext, aad, record[RECORD.size :])
        return record

    def _job(self, segment: int, slot: _Slot, length: int, last: bool) -> None:
        """Seal one segment, then write it when the segments before it are written."""
        record: memoryview | None = None
        error: BaseException | None = None
        try:
            if not self._aborted:
                record = self._seal(segment, slot, length, last, compress=True)
        except BaseException as exc:  # handed to the caller's thread, never lost
            error = exc
        with self._turn:
            while self._next_write != segment:
                self._turn.wait()
        # Our turn: no other thread writes until _next_write moves on.
        try:
            if record is not None and error is None and not self._aborted:
                _write_all(self._dest, record)
                self.stored_bytes += len(record)
        except BaseException as exc:
            error = exc
        with self._turn:
            if error is not None and self._failure is None:
                self._failure = error
                self._aborted = True  # later segments are neither sealed nor written
            self._next_write += 1
            self._pool.give(slot)
            self._turn.notify_all()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            self._closed = True
            raise self._failure

    def _acquire(self) -> _Slot:
        with self._turn:
            while (slot := self._pool.take()) is None:
                self._raise_failure()
                self._turn.wait()
            self._raise_failure()
            return slot

    def _submit(self, slot: _Slot, length: int, last: bool) -> None:
        segment = self._segment
        self._segment += 1
        compress = self._to_compress(segment, slot, length)
        if compress and not (last and segment == 0):  # no thread for a one-segment archive
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="archive")
            self._executor.submit(self._job, segment, slot, length, last)
            return
        # Sealing alone is cheap next to reading and writing: done here, it costs no hand-off
        # between threads, which on a busy machine each wait for a time slice. Random data
        # thus never starts a worker, nor allocates more than two slots.
        record = self._seal(segment, slot, length, last, compress=compress)
        with self._turn:
            while self._next_write != segment:
                self._raise_failure()
                self._turn.wait()
            self._raise_failure()
        _write_all(self._dest, record)
        self.stored_bytes += len(record)
        with self._turn:
            self._next_write += 1
            self._pool.give(slot)
            self._turn.notify_all()

    def _wait_written(self) -> None:
        """Until every submitted segment is written (or one failed)."""
        with self._turn:
            while self._next_write < self._segment and self._failure is None:
                self._turn.wait()
            self._raise_failure()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed archive")
        view = memoryview(data).cast("B")
        taken = 0
        while taken < len(view):
            # Keep a full segment back: only close() knows whether it is the last one.
            if self._fill == self._size:
                self._submit(self._slot, self._fill, last=False)
                self._slot, self._fill = self._acquire(), 0
            count = min(self._size - self._fill, len(view) - taken)
            self._slot.input[self._fill : self._fill + count] = view[taken : taken + count]
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
                count = source.readinto(self._slot.input[self._fill : self._fill + room])
                if not count:
                    break
                self._fill += count
            else:
                # Only a read past the full segment tells whether it is the last one.
                spare = self._acquire()
                count = source.readinto(spare.input[:room])
                if not count:
                    with self._turn:
                        self._pool.give(spare)
                    break
                self._submit(self._slot, self._fill, last=False)
                self._slot, self._fill = spare, count
            total += count
        self.plaintext_bytes += total
        return total

    def close(self) -> None:
        if self._closed:
            return
        self._raise_failure()
        self._closed = True
        try:
            self._submit(self._slot, self._fill, last=True)
            self._wait_written()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._executor is not None:
            # Queued jobs still run (each waits for its turn), but skip their work.
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
            with self._turn:
                self._aborted = True
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


def _iter_v2(stream: BinaryIO, parsed: ParsedHeader, data_key: bytes) -> Iterator[memoryview]:
    header = parsed.header
    aead = AESGCM(segment_key(data_key, header.salt))
    digest = v1.authenticate_header(parsed, aead)
    size = header.segment_size
    decompressors = _Compressors()

    def open_segment(segment: int, flags: int, stored: int, length: int, slot: _Slot) -> memoryview:
        aad = _SEGMENT_AAD.pack(digest, segment, flags, length)
        plaintext = slot.output[:stored]
        try:
            aead.decrypt_into(v1.segment_nonce(segment), slot.input[: stored + TAG_SIZE], aad,
                              plaintext)  # fmt: skip
        except InvalidTag:
            raise SegmentError(
                segment,
                f"segment {segment} failed authentication: it was modified, truncated, "
                "reordered or comes from another archive",
            ) from None
        if not flags & FLAG_ZSTD:
            return plaintext
        import zstandard

        decompressor = decompressors.by_level.get(0)
        if decompressor is None:
            decompressor = zstandard.ZstdDecompressor()
            decompressors.by_level[0] = decompressor
        try:
            unpacked = decompressor.decompress(plaintext, max_output_size=length)  # type: ignore[attr-defined]
        except zstandard.ZstdError as exc:
            raise PayloadError(f"segment {segment} does not decompress: {exc}") from None
        if len(unpacked) != length:
            raise PayloadError(f"segment {segment} decompresses to the wrong length")
        return memoryview(unpacked)

    prefix = memoryview(bytearray(RECORD.size))

    def next_record(segment: int, slot: _Slot) -> tuple[int, int, int] | None:
        """Read one record into `slot`; None at end of input. Lengths checked before any work."""
        got = _read_into(stream, prefix)
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
        if _read_into(stream, slot.input[: stored + TAG_SIZE]) < stored + TAG_SIZE:
            raise TruncatedError(f"archive truncated inside segment {segment}")
        return flags, stored, length

    executor: ThreadPoolExecutor | None = None
    depth = _worker_count() + 1
    pool = _Pool(depth + 1, size + TAG_SIZE, size)  # one more: the segment being consumed
    # A compressed segment is opened on a worker (decompressing is the work); a raw one later,
    # on the consumer's thread: decrypting alone is cheap next to the hand-off between threads.
    Job = Future[memoryview] | Callable[[], memoryview]
    pending: collections.deque[tuple[Job, _Slot, bool]] = collections.deque()
    segment = 0
    ended = False
    deferred: ArchiveError | None = None  # raised once the segments before it are out

    def reading_ahead_helps() -> bool:
        # Only while a worker has something to do: raw segments are read as they are wanted,
        # so a raw archive is opened with one slot and no thread.
        return not pending or isinstance(pending[-1][0], Future)

    try:
        while True:
            while (
                not ended
                and len(pending) < depth
                and reading_ahead_helps()
                and (slot := pool.take()) is not None
            ):
                try:
                    record = next_record(segment, slot)
                except ArchiveError as exc:
                    pool.give(slot)
                    deferred, ended = exc, True
                    break
                if record is None:
                    pool.give(slot)
                    deferred = TruncatedError(
                        f"archive truncated: it ends after segment {segment - 1} "
                        "without a last segment"
                        if segment
                        else "archive truncated: no segments after the header"
                    )
                    ended = True
                    break
                flags, stored, length = record
                ended = bool(flags & FLAG_LAST)
                job: Job
                if flags & FLAG_ZSTD and not (ended and segment == 0):
                    if executor is None:
                        executor = ThreadPoolExecutor(_worker_count(), thread_name_prefix="archive")
                    job = executor.submit(open_segment, segment, flags, stored, length, slot)
                else:
                    job = functools.partial(open_segment, segment, flags, stored, length, slot)
                pending.append((job, slot, ended))
                segment += 1
            if not pending:
                if deferred is not None:
                    raise deferred
                return
            job, slot, last = pending.popleft()
            try:
                plaintext = job.result() if isinstance(job, Future) else job()
                if last and stream.read(1):
                    raise TrailingDataError(
                        f"unexpected data after the last segment ({segment - 1})"
                    )
                yield plaintext  # valid until the consumer asks for the next segment
            finally:
                pool.give(slot)
    finally:
        for job, _, _ in pending:
            if isinstance(job, Future):
                job.cancel()
        if executor is not None:
            executor.shutdown(wait=True)


def iter_segments(
    stream: BinaryIO, parsed: ParsedHeader, data_key: bytes
) -> Iterator[bytes | memoryview]:
    """Each segment's plaintext, in order, once its tag verified.

    A view yielded stays valid only until the next segment is asked for.

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
        segments: Iterator[bytes | memoryview],
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
        parts: list[bytes] = []  # copies: a view lasts only until the next segment
        wanted = size
        while wanted:
            view = self.readview(wanted)
            if not view:
                break
            parts.append(view.tobytes())
            wanted -= len(view)
        return parts[0] if len(parts) == 1 else b"".join(parts)

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
