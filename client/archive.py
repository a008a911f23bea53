"""The encrypted backup archive: a header, then AES-256-GCM sealed segments.

The byte layout is specified in docs/archive-format.md. Encryption and
decryption both stream: memory use is a couple of segments, whatever the
size of the payload.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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


class SupportsReadinto(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


# What a pipeline may hold in segment buffers: 4 slots (input and output) of 1 MiB segments.
# Larger segments get fewer slots, never fewer than 2 (one segment and its lookahead).
_PIPELINE_BUFFER_BUDGET = 4 * (2 * DEFAULT_SEGMENT_SIZE + TAG_SIZE)
# AESGCM.encrypt_into/decrypt_into (recent cryptography) write into our buffers: no allocation;
# older versions allocate each output and it is copied or written from there.
_HAS_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")


def _worker_count() -> int:
    """Threads sealing or opening segments: AES-GCM releases the GIL, so one per core (max 4)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def _write_all(dest: Writable, data: memoryview) -> None:
    """Write every byte: a raw (unbuffered) file may accept only part of a large write."""
    while data:
        written = dest.write(data)  # type: ignore[arg-type]
        if not isinstance(written, int) or written >= len(data):
            return
        if written <= 0:
            raise OSError("the archive output accepted no bytes")
        data = data[written:]


class _Slot:
    """One segment's input and output buffers; a pipeline reuses a fixed set of them."""

    __slots__ = ("input", "output")

    def __init__(self, input_size: int, output_size: int) -> None:
        self.input = memoryview(bytearray(input_size))
        self.output = memoryview(bytearray(output_size))


class _Pipeline:
    """Runs one AES-GCM operation per segment on worker threads, output in segment order.

    The caller fills a slot's input and submits it with a job; a worker runs the job
    (which returns the output view to write, or raises), then waits for its turn and
    writes it to `dest`. Once a job failed, no later output is written. Memory is the
    fixed set of slots; `acquire` blocks (collecting the oldest job) until one is free.
    Errors surface in segment order from `acquire`, `finish` and `abort`.
    """

    def __init__(
        self, dest: Writable | None, input_size: int, output_size: int, *, slots: int = 0
    ) -> None:
        self._dest = dest
        self._workers = _worker_count()
        if not slots:
            affordable = _PIPELINE_BUFFER_BUDGET // (input_size + output_size)
            slots = max(2, min(self._workers + 2, affordable))
        self._sizes = (input_size, output_size)
        self._slots = slots  # allocated on demand: a small archive needs one or two
        self._free: list[_Slot] = []
        self._pending: collections.deque[tuple[Future[None], _Slot]] = collections.deque()
        self._executor: ThreadPoolExecutor | None = None
        self._turn = threading.Condition()
        self._next = 0  # the segment whose output is written next
        self._submitted = 0
        self._failed = False  # a job failed: later output is not written
        self._aborted = False  # nothing more is written, and nobody waits for a turn

    def acquire(self) -> _Slot:
        if not self._free:
            if self._slots:
                self._slots -= 1
                return _Slot(*self._sizes)
            self._collect_oldest()
        return self._free.pop()

    def release(self, slot: _Slot) -> None:
        """Give back a slot that was acquired but not submitted."""
        self._free.append(slot)

    def submit(self, slot: _Slot, job: Callable[[_Slot], memoryview | None]) -> None:
        index = self._submitted
        self._submitted += 1
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._workers, thread_name_prefix="archive"
            )
        self._pending.append((self._executor.submit(self._run, index, slot, job), slot))

    def run_inline(self, slot: _Slot, job: Callable[[_Slot], memoryview | None]) -> None:
        """Run a job on this thread (a single-segment archive needs no threads)."""
        if self._submitted:
            self.submit(slot, job)
            return
        self._submitted = 1
        try:
            self._run(0, slot, job)
        finally:
            self._free.append(slot)

    def _run(self, index: int, slot: _Slot, job: Callable[[_Slot], memoryview | None]) -> None:
        failure: BaseException | None = None
        output: memoryview | None = None
        try:
            output = job(slot)
        except BaseException as exc:
            failure = exc
        with self._turn:
            while self._next != index and not self._aborted:
                self._turn.wait()
        try:
            if (
                failure is None
                and not (self._failed or self._aborted)
                and output is not None
                and self._dest is not None
            ):
                _write_all(self._dest, output)
        except BaseException as exc:
            failure = exc
        finally:
            with self._turn:
                self._failed = self._failed or failure is not None
                self._next = index + 1
                self._turn.notify_all()
        if failure is not None:
            raise failure

    def _collect_oldest(self) -> None:
        future, slot = self._pending.popleft()
        try:
            future.result()
        except BaseException:
            self.abort()  # the first failure is final: later segments no longer matter
            raise
        finally:
            self._free.append(slot)

    def finish(self) -> None:
        """Wait for every submitted segment to be written; raises the first failure."""
        try:
            while self._pending:
                self._collect_oldest()
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop writing, wait for the workers and drop them; raises nothing."""
        with self._turn:
            if self._pending:
                self._aborted = True
                self._turn.notify_all()
        while self._pending:
            future, slot = self._pending.popleft()
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result()
            self._free.append(slot)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class ArchiveWriter:
    """A write-only file object that seals what is written into archive segments.

    Call `close()` (or use it as a context manager) to seal the last segment;
    an archive that is not closed reads as truncated, never as complete.
    Segments are sealed on worker threads and written to `dest` in order;
    `readfrom` fills segment buffers straight from a file with no extra copy.
    """

    def __init__(self, dest: Writable, header: ArchiveHeader, data_key: bytes) -> None:
        self._aead = _check_data_key(data_key)
        self._segment_size = size = header.segment_size
        raw = header.encode()
        self._header_digest = hashlib.sha256(raw).digest()
        dest.write(raw)
        dest.write(self._aead.encrypt(_HEADER_NONCE, b"", raw))
        self._pipeline = _Pipeline(dest, size, size + TAG_SIZE)
        self._slot = self._pipeline.acquire()
        self._fill = 0  # bytes of the current segment held in self._slot.input
        self._segment = 0
        self._closed = False
        self.plaintext_bytes = 0

    def _sealer(self, segment: int, length: int, last: bool) -> Callable[[_Slot], memoryview]:
        aead = self._aead
        nonce = _segment_nonce(segment)
        aad = _SEGMENT_AAD.pack(self._header_digest, segment, last)

        def seal(slot: _Slot) -> memoryview:
            plaintext = slot.input[:length]
            if _HAS_INTO:
                output = slot.output[: length + TAG_SIZE]
                aead.encrypt_into(nonce, plaintext, aad, output)
                return output
            return memoryview(aead.encrypt(nonce, plaintext, aad))

        return seal

    def _seal_full_segment(self) -> None:
        """More data follows the full segment held back: seal it as not last."""
        self._pipeline.submit(self._slot, self._sealer(self._segment, self._fill, last=False))
        self._segment += 1
        self._slot = self._pipeline.acquire()
        self._fill = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed archive")
        view = memoryview(data).cast("B")
        size = self._segment_size
        taken = 0
        while taken < len(view):
            # Keep a full segment back: only close() knows whether it is the last one.
            if self._fill == size:
                self._seal_full_segment()
            count = min(size - self._fill, len(view) - taken)
            self._slot.input[self._fill : self._fill + count] = view[taken : taken + count]
            self._fill += count
            taken += count
        self.plaintext_bytes += taken
        return taken

    def readfrom(self, source: SupportsReadinto) -> int:
        """Read `source` to its end straight into segment buffers; returns the bytes read."""
        if self._closed:
            raise ValueError("write to a closed archive")
        size = self._segment_size
        total = 0
        while True:
            if self._fill < size:
                count = source.readinto(self._slot.input[self._fill :])
                if not count:
                    break
                self._fill += count
            else:
                # Only a read past the full segment tells whether it is the last one.
                spare = self._pipeline.acquire()
                count = source.readinto(spare.input)
                if not count:
                    self._pipeline.release(spare)
                    break
                self._pipeline.submit(
                    self._slot, self._sealer(self._segment, self._fill, last=False)
                )
                self._segment += 1
                self._slot, self._fill = spare, count
            total += count
            self.plaintext_bytes += count
        return total

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            sealer = self._sealer(self._segment, self._fill, last=True)
            self._pipeline.run_inline(self._slot, sealer)
            self._segment += 1
            self._pipeline.finish()
        finally:
            self._pipeline.abort()

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
            self._pipeline.abort()


def _authenticate_header(parsed: ParsedHeader, data_key: bytes) -> tuple[AESGCM, bytes]:
    """The AEAD for the data key once the header tag verified, and the header digest."""
    aead = _check_data_key(data_key)
    try:
        aead.decrypt(_HEADER_NONCE, parsed.tag, parsed.raw)
    except InvalidTag:
        raise HeaderError(
            "header authentication failed: the header was tampered with "
            "or the data key is not this archive's"
        ) from None
    return aead, hashlib.sha256(parsed.raw).digest()


def _segment_failure(
    aead: AESGCM, header_digest: bytes, segment: int, chunk: memoryview, last: bool, full: bool
) -> ArchiveError:
    """Why segment `segment` failed: tried with the other last flag, as the format says."""

    def opens(as_last: bool) -> bool:
        aad = _SEGMENT_AAD.pack(header_digest, segment, as_last)
        try:
            aead.decrypt(_segment_nonce(segment), chunk, aad)
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


def iter_plaintext(stream: BinaryIO, parsed: ParsedHeader, data_key: bytes) -> Iterator[bytes]:
    """Authenticate the header, then yield each segment's plaintext once it verified.

    Raises an `ArchiveError` subclass naming what failed; a caller must treat
    everything yielded so far as unverified until the iterator is exhausted.
    One segment at a time on this thread; `decrypt_to` and `verify` are faster.
    """
    aead, header_digest = _authenticate_header(parsed, data_key)
    chunk_size = parsed.header.segment_size + TAG_SIZE

    segment = 0
    chunk = _read_exactly(stream, chunk_size)
    while True:
        if not chunk:
            raise TruncatedError(_no_last_segment(segment))
        if len(chunk) < TAG_SIZE:
            raise TruncatedError(f"archive truncated inside segment {segment}")
        # A full chunk may or may not be the last: look one chunk ahead to know.
        following = _read_exactly(stream, chunk_size) if len(chunk) == chunk_size else b""
        is_last = not following
        aad = _SEGMENT_AAD.pack(header_digest, segment, is_last)
        try:
            plaintext = aead.decrypt(_segment_nonce(segment), chunk, aad)
        except InvalidTag:
            full = len(chunk) == chunk_size
            raise _segment_failure(
                aead, header_digest, segment, memoryview(chunk), is_last, full
            ) from None
        yield plaintext
        if is_last:
            return
        segment += 1
        chunk = following


def _no_last_segment(segment: int) -> str:
    return (
        f"archive truncated: it ends after segment {segment - 1} without a last segment"
        if segment
        else "archive truncated: no segments after the header"
    )


def _read_into(stream: BinaryIO, buffer: memoryview) -> int:
    """Fill `buffer`, less only at end of input (pipes return short reads); returns the count."""
    readinto = getattr(stream, "readinto", None)
    filled = 0
    while filled < len(buffer):
        if readinto is not None:
            count = readinto(buffer[filled:]) or 0
        else:
            data = stream.read(len(buffer) - filled)
            count = len(data)
            buffer[filled : filled + count] = data
        if not count:
            break
        filled += count
    return filled


def _open_segments(
    stream: BinaryIO, parsed: ParsedHeader, data_key: bytes, dest: Writable | None
) -> int:
    """Authenticate and open every segment, writing verified plaintext to `dest` in order.

    Segments are opened on worker threads; a segment's plaintext is written only
    after its tag verified, and nothing after the first failed segment is written.
    Errors are those a one-segment-at-a-time reader meets first. Returns the size.
    """
    aead, header_digest = _authenticate_header(parsed, data_key)
    segment_size = parsed.header.segment_size
    chunk_size = segment_size + TAG_SIZE

    def opener(segment: int, length: int, last: bool) -> Callable[[_Slot], memoryview]:
        nonce = _segment_nonce(segment)
        aad = _SEGMENT_AAD.pack(header_digest, segment, last)

        def open_segment(slot: _Slot) -> memoryview:
            chunk = slot.input[:length]
            plaintext = slot.output[: length - TAG_SIZE]
            try:
                if _HAS_INTO:
                    aead.decrypt_into(nonce, chunk, aad, plaintext)
                else:
                    plaintext[:] = aead.decrypt(nonce, chunk, aad)
            except InvalidTag:
                plaintext[:] = bytes(len(plaintext))  # unverified: never kept
                full = length == chunk_size
                raise _segment_failure(aead, header_digest, segment, chunk, last, full) from None
            return plaintext

        return open_segment

    pipeline = _Pipeline(dest, chunk_size, segment_size)
    total = 0
    try:
        segment = 0
        slot = pipeline.acquire()
        length = _read_into(stream, slot.input)
        while True:
            if not length:
                raise TruncatedError(_no_last_segment(segment))
            if length < TAG_SIZE:
                raise TruncatedError(f"archive truncated inside segment {segment}")
            # A full chunk may or may not be the last: look one chunk ahead to know.
            is_last = True
            if length == chunk_size:
                following = pipeline.acquire()
                following_length = _read_into(stream, following.input)
                if following_length:
                    is_last = False
                else:
                    pipeline.release(following)
            total += length - TAG_SIZE
            if is_last:
                pipeline.run_inline(slot, opener(segment, length, last=True))
                break
            pipeline.submit(slot, opener(segment, length, last=False))
            segment += 1
            slot, length = following, following_length
        pipeline.finish()
    except BaseException:
        # A failed earlier segment is what a sequential reader would have reported.
        pipeline.finish()
        raise
    return total


def decrypt_to(stream: BinaryIO, parsed: ParsedHeader, data_key: bytes, out: Writable) -> int:
    """Decrypt every segment into `out`; returns the plaintext size.

    Only verified plaintext is written, but a caller must treat `out` as
    unverified until this returns (a later segment may still fail).
    """
    return _open_segments(stream, parsed, data_key, out)


def verify(stream: BinaryIO, parsed: ParsedHeader, data_key: bytes) -> int:
    """Check every segment without keeping any plaintext; returns the plaintext size."""
    return _open_segments(stream, parsed, data_key, None)


def copy_into(source: Readable, writer: ArchiveWriter, chunk_size: int) -> None:
    """Stream `source` into `writer`: straight into its segment buffers when it can readinto."""
    if hasattr(source, "readinto"):
        writer.readfrom(source)  # type: ignore[arg-type]
        return
    while chunk := source.read(chunk_size):
        writer.write(chunk)
