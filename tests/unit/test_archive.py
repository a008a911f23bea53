"""The archive format (version 2) on its own: round trips, compression and every tampering."""

from __future__ import annotations

import io
import os
import struct

import pytest

from client.archive import (
    RECORD,
    SALT_SIZE,
    TAG_SIZE,
    ArchiveError,
    ArchiveHeader,
    ArchiveWriter,
    Compression,
    HeaderError,
    NotAnArchiveError,
    PayloadKind,
    PlaintextReader,
    SegmentError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
    iter_segments,
    parse_compression,
    read_header,
)
from client.archive import segments as segments_module
from client.archive.segments import FLAG_LAST, FLAG_ZSTD

SEGMENT = 64  # small segments keep the multi-segment cases cheap
KEY = bytes(range(32))


def make_header(
    backup_id: str = "backup-1",
    segment_size: int = SEGMENT,
    compression: Compression = Compression.NONE,
    salt: bytes | None = None,
) -> ArchiveHeader:
    return ArchiveHeader(
        backup_id=backup_id,
        key_name="tenant-a",
        key_version=3,
        wrapped_data_key=b"\x01wrapped-by-the-server",
        payload_kind=PayloadKind.STREAM,
        segment_size=segment_size,
        create_time=1_700_000_000,
        compression=compression,
        compression_level=3 if compression is Compression.ZSTD else 0,
        salt=salt if salt is not None else os.urandom(SALT_SIZE),
    )


def seal(payload: bytes, header: ArchiveHeader | None = None, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    with ArchiveWriter(out, header or make_header(), key) as writer:
        writer.write(payload)
    return out.getvalue()


def open_archive(archive: bytes, key: bytes = KEY) -> bytes:
    stream = io.BytesIO(archive)
    parsed = read_header(stream)
    return b"".join(bytes(p) for p in iter_segments(stream, parsed, key))


def header_size(archive: bytes) -> int:
    return len(read_header(io.BytesIO(archive)).raw) + TAG_SIZE


def segments(archive: bytes) -> list[bytes]:
    """The records after the header, cut by their own length fields."""
    body, parts = archive[header_size(archive) :], []
    while body:
        _, stored, _ = RECORD.unpack_from(body)
        size = RECORD.size + stored + TAG_SIZE
        parts.append(body[:size])
        body = body[size:]
    return parts


def rebuild(archive: bytes, parts: list[bytes]) -> bytes:
    return archive[: header_size(archive)] + b"".join(parts)


def flip(data: bytes, index: int, bit: int = 0x01) -> bytes:
    damaged = bytearray(data)
    damaged[index] ^= bit
    return bytes(damaged)


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.ZSTD])
@pytest.mark.parametrize(
    "size",
    [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 2 * SEGMENT, 10 * SEGMENT + 7],
    ids=lambda n: f"{n}-bytes",
)
def test_round_trip_returns_the_same_bytes(size: int, compression: Compression) -> None:
    payload = os.urandom(size // 2) + bytes(size - size // 2)
    assert open_archive(seal(payload, make_header(compression=compression))) == payload


def test_empty_input_is_one_empty_last_segment() -> None:
    archive = seal(b"")
    [only] = segments(archive)
    assert RECORD.unpack_from(only) == (FLAG_LAST, 0, 0)
    assert open_archive(archive) == b""


def test_input_of_exactly_one_segment_makes_one_segment() -> None:
    assert len(segments(seal(os.urandom(SEGMENT)))) == 1


def test_writes_in_odd_sized_pieces_make_the_same_plaintext() -> None:
    payload = os.urandom(5 * SEGMENT + 3)
    out = io.BytesIO()
    with ArchiveWriter(out, make_header(), KEY) as writer:
        for start in range(0, len(payload), 13):
            writer.write(payload[start : start + 13])
    assert open_archive(out.getvalue()) == payload
    assert len(segments(out.getvalue())) == 6


def test_header_round_trips_through_the_archive() -> None:
    header = make_header(compression=Compression.ZSTD)
    parsed = read_header(io.BytesIO(seal(b"x", header)))
    assert parsed.header == header
    assert parsed.header.version == 2
    assert parsed.header.compression_label == "zstd:3"


def test_the_same_backup_id_and_key_never_repeat_a_key_nonce_pair() -> None:
    # A client reusing a backup id gets the same data key; the random salt still makes
    # the segment key, and so every ciphertext, different.
    payload = bytes(SEGMENT * 3)
    first, second = seal(payload, make_header()), seal(payload, make_header())
    assert segments(first) != segments(second)
    assert not set(segments(first)) & set(segments(second))


def test_the_salt_decides_the_segment_key() -> None:
    salt = os.urandom(SALT_SIZE)
    payload = os.urandom(2 * SEGMENT)
    first, second = seal(payload, make_header(salt=salt)), seal(payload, make_header(salt=salt))
    assert segments(first) == segments(second)  # same salt, key and payload: same records


def test_compressible_segments_shrink_and_carry_the_zstd_flag() -> None:
    payload = b"INSERT INTO t VALUES (1, 'abc');\n" * 200
    header = make_header(segment_size=1024, compression=Compression.ZSTD)
    archive = seal(payload, header)
    flags = [RECORD.unpack_from(part)[0] for part in segments(archive)]
    assert all(flag & FLAG_ZSTD for flag in flags)
    assert len(archive) < len(payload) // 5
    assert open_archive(archive) == payload


def test_incompressible_segments_are_stored_raw() -> None:
    payload = os.urandom(4 * SEGMENT)
    archive = seal(payload, make_header(compression=Compression.ZSTD))
    for part in segments(archive):
        flags, stored, length = RECORD.unpack_from(part)
        assert not flags & FLAG_ZSTD
        assert stored == length
    assert open_archive(archive) == payload


def test_the_compression_flag_is_authenticated() -> None:
    header = make_header(segment_size=1024, compression=Compression.ZSTD)
    archive = seal(b"a" * 3000, header)
    parts = segments(archive)
    parts[0] = flip(parts[0], 0, FLAG_ZSTD)  # claim "raw": lengths then disagree or tag fails
    with pytest.raises(SegmentError, match="segment 0"):
        open_archive(rebuild(archive, parts))


def test_a_forged_plaintext_length_is_refused() -> None:
    header = make_header(segment_size=1024, compression=Compression.ZSTD)
    archive = seal(b"a" * 3000, header)
    parts = segments(archive)
    flags, stored, length = RECORD.unpack_from(parts[2])
    parts[2] = RECORD.pack(flags, stored, length - 1) + parts[2][RECORD.size :]
    with pytest.raises(SegmentError, match="segment 2 failed authentication"):
        open_archive(rebuild(archive, parts))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ((0x80, SEGMENT, SEGMENT), "unknown flags"),
        ((0, SEGMENT, SEGMENT + 1), "claims"),
        ((0, SEGMENT - 1, SEGMENT - 1), "claims"),  # not last, yet short
        ((FLAG_ZSTD, SEGMENT, SEGMENT), "impossible stored length"),
        ((0, SEGMENT - 2, SEGMENT), "impossible stored length"),
    ],
)
def test_impossible_record_lengths_are_refused_before_decryption(
    record: tuple[int, int, int], message: str
) -> None:
    archive = seal(os.urandom(3 * SEGMENT))
    parts = segments(archive)
    parts[1] = RECORD.pack(*record) + parts[1][RECORD.size :]
    with pytest.raises(SegmentError, match=message):
        open_archive(rebuild(archive, parts))


def test_a_huge_stored_length_is_refused_without_allocating_it() -> None:
    archive = seal(os.urandom(3 * SEGMENT))
    parts = segments(archive)
    parts[1] = struct.pack(">BII", 0, 0xFFFFFFFF, SEGMENT) + parts[1][RECORD.size :]
    with pytest.raises(SegmentError, match="segment 1"):
        open_archive(rebuild(archive, parts))


def test_wrong_key_fails_on_the_header() -> None:
    with pytest.raises(HeaderError, match="header authentication failed"):
        open_archive(seal(b"secret"), key=bytes(32))


@pytest.mark.parametrize("offset", [8, 14, 15, 16, 20, 27, 35, 40, 70])
def test_editing_any_header_byte_is_detected(offset: int) -> None:
    archive = flip(seal(os.urandom(3 * SEGMENT)), offset)
    with pytest.raises(ArchiveError):
        open_archive(archive)


def test_changing_the_backup_id_fails_header_authentication() -> None:
    archive = seal(b"payload", make_header("backup-1"))
    with pytest.raises(HeaderError, match="tampered"):
        open_archive(archive.replace(b"backup-1", b"backup-2", 1))


def test_editing_the_header_tag_is_detected() -> None:
    archive = seal(b"payload")
    with pytest.raises(HeaderError):
        open_archive(flip(archive, header_size(archive) - 1, 0x80))


def test_not_an_archive_is_reported_as_such() -> None:
    with pytest.raises(NotAnArchiveError):
        open_archive(b"PK\x03\x04 definitely a zip file")


def test_unknown_format_version_is_refused() -> None:
    archive = bytearray(seal(b"x"))
    archive[9] = 99
    with pytest.raises(UnsupportedVersionError, match="99"):
        open_archive(bytes(archive))


@pytest.mark.parametrize("cut", [9, 12, 20, 60])
def test_truncation_inside_the_header_is_detected(cut: int) -> None:
    with pytest.raises(HeaderError, match="truncated"):
        read_header(io.BytesIO(seal(b"x")[:cut]))


@pytest.mark.parametrize(
    "body",
    [b"", b"\x03\x00", bytes(50), bytes(51) + b"\xff\xff"],
    ids=["empty", "short", "no-fields", "field-past-end"],
)
def test_a_malformed_header_body_is_refused_precisely(body: bytes) -> None:
    raw = b"KMSBKUP\x00" + struct.pack(">HI", 2, len(body)) + body + bytes(TAG_SIZE)
    with pytest.raises(HeaderError, match="malformed header"):
        read_header(io.BytesIO(raw))


def test_a_header_length_over_the_limit_is_refused() -> None:
    raw = b"KMSBKUP\x00" + struct.pack(">HI", 2, 1 << 30)
    with pytest.raises(HeaderError, match="exceeds"):
        read_header(io.BytesIO(raw))


def test_flipped_bit_names_the_segment() -> None:
    archive = seal(os.urandom(4 * SEGMENT))
    parts = segments(archive)
    parts[2] = flip(parts[2], RECORD.size + 5, 0x04)
    with pytest.raises(SegmentError, match="segment 2") as caught:
        open_archive(rebuild(archive, parts))
    assert caught.value.segment == 2


def test_flipped_tag_bit_in_the_last_segment_is_detected() -> None:
    archive = seal(os.urandom(2 * SEGMENT + 10))
    with pytest.raises(SegmentError, match="segment 2"):
        open_archive(flip(archive, len(archive) - 1))


def test_truncation_at_a_segment_boundary_is_reported_as_truncation() -> None:
    archive = seal(os.urandom(4 * SEGMENT + 10))
    with pytest.raises(TruncatedError, match="ends after segment 2"):
        open_archive(rebuild(archive, segments(archive)[:3]))


def test_truncation_after_the_header_is_reported_as_truncation() -> None:
    archive = seal(os.urandom(SEGMENT))
    with pytest.raises(TruncatedError, match="no segments"):
        open_archive(archive[: header_size(archive)])


@pytest.mark.parametrize("cut", [1, 7, RECORD.size + TAG_SIZE + SEGMENT - 3])
def test_truncation_inside_a_segment_is_detected(cut: int) -> None:
    archive = seal(os.urandom(3 * SEGMENT))
    with pytest.raises(TruncatedError, match="inside segment 2"):
        open_archive(archive[:-cut])


def test_flipping_the_last_flag_is_detected() -> None:
    archive = seal(os.urandom(3 * SEGMENT))
    parts = segments(archive)
    parts[1] = flip(parts[1], 0, FLAG_LAST)  # a middle segment claims to be the last
    with pytest.raises(SegmentError, match="segment 1"):
        open_archive(rebuild(archive, parts))


def test_dropping_a_middle_segment_is_detected() -> None:
    archive = seal(os.urandom(4 * SEGMENT))
    parts = segments(archive)
    with pytest.raises(SegmentError, match="segment 1"):
        open_archive(rebuild(archive, parts[:1] + parts[2:]))


def test_dropping_the_last_segment_is_truncation() -> None:
    archive = seal(os.urandom(4 * SEGMENT))
    with pytest.raises(TruncatedError):
        open_archive(rebuild(archive, segments(archive)[:-1]))


def test_reordering_segments_is_detected() -> None:
    archive = seal(os.urandom(4 * SEGMENT))
    parts = segments(archive)
    parts[0], parts[1] = parts[1], parts[0]
    with pytest.raises(SegmentError, match="segment 0"):
        open_archive(rebuild(archive, parts))


def test_duplicating_a_segment_is_detected() -> None:
    archive = seal(os.urandom(4 * SEGMENT))
    parts = segments(archive)
    with pytest.raises(SegmentError, match="segment 2"):
        open_archive(rebuild(archive, [*parts[:2], parts[1], *parts[2:]]))


@pytest.mark.parametrize("extra", [b"x", b"extra bytes", None], ids=["byte", "bytes", "copy"])
def test_data_after_the_last_segment_is_reported_as_trailing_data(extra: bytes | None) -> None:
    archive = seal(os.urandom(2 * SEGMENT + 5))
    appended = extra if extra is not None else segments(archive)[-1]
    with pytest.raises(TrailingDataError, match="after the last segment"):
        open_archive(archive + appended)


def test_splicing_a_segment_from_another_archive_with_the_same_key_is_detected() -> None:
    first = seal(os.urandom(3 * SEGMENT), make_header("backup-1"))
    second = seal(os.urandom(3 * SEGMENT), make_header("backup-2"))
    parts = segments(first)
    parts[1] = segments(second)[1]
    with pytest.raises(SegmentError, match="segment 1"):
        open_archive(rebuild(first, parts))


def test_a_header_from_another_archive_is_detected() -> None:
    first = seal(os.urandom(3 * SEGMENT), make_header("backup-1"))
    second = seal(os.urandom(3 * SEGMENT), make_header("backup-2"))
    with pytest.raises(SegmentError, match="segment 0"):
        open_archive(second[: header_size(second)] + first[header_size(first) :])


def test_writer_that_failed_midway_leaves_no_last_segment() -> None:
    out = io.BytesIO()
    with pytest.raises(RuntimeError), ArchiveWriter(out, make_header(), KEY) as writer:
        writer.write(os.urandom(30 * SEGMENT))
        raise RuntimeError("source vanished")
    with pytest.raises(TruncatedError):
        open_archive(out.getvalue())


def test_data_key_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ArchiveError, match="32 bytes"):
        ArchiveWriter(io.BytesIO(), make_header(), b"short")


def test_oversized_segment_size_in_a_header_is_refused() -> None:
    archive = bytearray(seal(b"x"))
    archive[17:21] = (1 << 30).to_bytes(4, "big")
    with pytest.raises(HeaderError, match="segment size"):
        read_header(io.BytesIO(bytes(archive)))


def test_archive_does_not_contain_the_data_key_or_plaintext() -> None:
    payload = b"very recognisable plaintext " * 10
    archive = seal(payload)
    assert KEY not in archive
    assert b"recognisable" not in archive


class TrickleReader(io.RawIOBase):
    """A pipe-like source: readinto returns at most `step` bytes at a time."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self._step, len(self._data))
        buffer[:count] = self._data[:count]
        self._data = self._data[count:]
        return count


@pytest.mark.parametrize("step", [1, 7, SEGMENT, 3 * SEGMENT + 1])
@pytest.mark.parametrize("size", [0, SEGMENT, 5 * SEGMENT, 40 * SEGMENT + 3])
def test_readfrom_with_short_reads_makes_the_same_archive(size: int, step: int) -> None:
    payload = os.urandom(size)
    header = make_header()
    out = io.BytesIO()
    with ArchiveWriter(out, header, KEY) as writer:
        assert writer.readfrom(TrickleReader(payload, step)) == size
    assert out.getvalue() == seal(payload, header)
    assert writer.plaintext_bytes == size
    assert writer.stored_bytes == len(out.getvalue())
    assert writer.segments_written == len(segments(out.getvalue()))


def test_readfrom_stops_at_its_limit() -> None:
    out = io.BytesIO()
    with ArchiveWriter(out, make_header(), KEY) as writer:
        assert writer.readfrom(io.BytesIO(b"a" * 500), 130) == 130
        writer.write(b"b")
    assert open_archive(out.getvalue()) == b"a" * 130 + b"b"


def test_many_segments_come_out_in_order() -> None:
    payload = os.urandom(300 * SEGMENT + 17)
    assert open_archive(seal(payload)) == payload


def test_reader_releases_verified_segments_before_a_later_failure() -> None:
    payload = os.urandom(50 * SEGMENT)
    archive = seal(payload)
    parts = segments(archive)
    parts[7] = flip(parts[7], RECORD.size)
    stream = io.BytesIO(rebuild(archive, parts))
    released = []
    with pytest.raises(SegmentError, match="segment 7"):
        for plaintext in iter_segments(stream, read_header(stream), KEY):
            released.append(bytes(plaintext))  # a view lasts until the next segment
    assert b"".join(released) == payload[: 7 * SEGMENT]


def test_a_failed_segment_is_reported_before_a_later_truncation() -> None:
    archive = seal(os.urandom(6 * SEGMENT + 9))
    parts = segments(archive)
    parts[3] = flip(parts[3], len(parts[3]) - 1)
    parts[5] = parts[5][:5]
    with pytest.raises(SegmentError, match="segment 3"):
        open_archive(rebuild(archive, parts[:6]))


def test_plaintext_reader_reads_across_segments() -> None:
    payload = os.urandom(7 * SEGMENT + 3)
    stream = io.BytesIO(seal(payload))
    reader = PlaintextReader(iter_segments(stream, read_header(stream), KEY))
    assert reader.read(10) == payload[:10]
    assert reader.read(SEGMENT * 2) == payload[10 : 10 + 2 * SEGMENT]
    assert reader.read() == payload[10 + 2 * SEGMENT :]
    assert reader.read(5) == b""
    assert reader.plaintext_bytes == len(payload)


class BrokenOutput(io.RawIOBase):
    def __init__(self, fail_after: int) -> None:
        self.writes = 0
        self._fail_after = fail_after

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        self.writes += 1
        if self.writes > self._fail_after:
            raise OSError(28, "No space left on device")
        return len(data)  # type: ignore[arg-type]


def test_an_output_error_while_sealing_propagates() -> None:
    out = BrokenOutput(fail_after=5)  # the header is one write, then one per segment
    with pytest.raises(OSError, match="No space"), ArchiveWriter(out, make_header(), KEY) as w:
        w.write(os.urandom(30 * SEGMENT))
    assert out.writes == 6


@pytest.mark.parametrize(
    ("text", "expected"),
    [("none", (Compression.NONE, 0)), ("zstd", (Compression.ZSTD, 3)),
     ("zstd:19", (Compression.ZSTD, 19))],
)  # fmt: skip
def test_compression_argument_is_parsed(text: str, expected: tuple[Compression, int]) -> None:
    assert parse_compression(text) == expected


@pytest.mark.parametrize("text", ["gzip", "zstd:0", "zstd:23", "zstd:fast", "zstd:"])
def test_a_bad_compression_argument_names_itself(text: str) -> None:
    if text == "zstd:":
        assert parse_compression(text) == (Compression.ZSTD, 3)
        return
    with pytest.raises(ValueError, match="--compression"):
        parse_compression(text)


def test_after_a_run_of_raw_segments_compressible_data_is_compressed_again() -> None:
    # Random data first: the writer stops sampling every segment; text afterwards must still
    # be found within the retry interval and compressed from there on.
    size = 64 << 10
    header = make_header(segment_size=size, compression=Compression.ZSTD)
    payload = os.urandom(20 * size) + b"INSERT INTO t VALUES (1, 'abc');\n" * (40 * size // 33)
    archive = seal(payload, header)
    flags = [RECORD.unpack_from(part)[0] for part in segments(archive)]
    assert not any(flag & FLAG_ZSTD for flag in flags[:20])
    # Segment 32 is the first retry in the text, and compresses. Segments the worker threads
    # were already sealing then may still have read the old streak: at most the queue depth.
    depth = segments_module._worker_count() + 2  # the writer keeps this many in flight
    assert flags[32] & FLAG_ZSTD
    assert all(flag & FLAG_ZSTD for flag in flags[32 + depth : -1])
    assert open_archive(archive) == payload


def test_segments_from_workers_and_from_the_callers_thread_land_in_order() -> None:
    # Text is compressed and written by the workers, random data sealed and written by the
    # caller's thread: interleaved, every record must still come out in its place.
    header = make_header(segment_size=4096, compression=Compression.ZSTD)
    parts = [
        os.urandom(5000) if i % 3 == 0 else b"row %d, some text; " % i * 300 for i in range(60)
    ]
    payload = b"".join(parts)
    archive = seal(payload, header)
    flags = [RECORD.unpack_from(part)[0] for part in segments(archive)]
    assert any(flag & FLAG_ZSTD for flag in flags)
    assert not all(flag & FLAG_ZSTD for flag in flags)
    assert open_archive(archive) == payload


def test_an_output_error_on_a_worker_propagates_and_nothing_is_written_after_it() -> None:
    out = BrokenOutput(fail_after=5)  # compressible: the workers write these segments
    header = make_header(compression=Compression.ZSTD)
    with pytest.raises(OSError, match="No space"), ArchiveWriter(out, header, KEY) as writer:
        writer.write(b"compressible text " * (30 * SEGMENT))
    assert out.writes == 6
