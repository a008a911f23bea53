"""The archive format on its own: round trips and every kind of tampering."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from client.archive import (
    TAG_SIZE,
    ArchiveError,
    ArchiveHeader,
    ArchiveWriter,
    HeaderError,
    NotAnArchiveError,
    PayloadKind,
    SegmentError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
    copy_into,
    decrypt_to,
    iter_plaintext,
    read_header,
    verify,
)

SEGMENT = 64  # small segments keep the multi-segment cases cheap
KEY = bytes(range(32))


def make_header(backup_id: str = "backup-1", segment_size: int = SEGMENT) -> ArchiveHeader:
    return ArchiveHeader(
        backup_id=backup_id,
        key_name="tenant-a",
        key_version=3,
        wrapped_data_key=b"\x01wrapped-by-the-server",
        payload_kind=PayloadKind.FILE,
        segment_size=segment_size,
        create_time=1_700_000_000,
    )


def seal(payload: bytes, header: ArchiveHeader | None = None, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    with ArchiveWriter(out, header or make_header(), key) as writer:
        writer.write(payload)
    return out.getvalue()


def open_archive(archive: bytes, key: bytes = KEY) -> bytes:
    stream = io.BytesIO(archive)
    parsed = read_header(stream)
    out = io.BytesIO()
    decrypt_to(stream, parsed, key, out)
    return out.getvalue()


def header_size(archive: bytes) -> int:
    return len(read_header(io.BytesIO(archive)).raw) + TAG_SIZE


def segments(archive: bytes) -> list[bytes]:
    body = archive[header_size(archive) :]
    step = SEGMENT + TAG_SIZE
    return [body[i : i + step] for i in range(0, len(body), step)]


def rebuild(archive: bytes, parts: list[bytes]) -> bytes:
    return archive[: header_size(archive)] + b"".join(parts)


@pytest.mark.parametrize(
    "size",
    [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 2 * SEGMENT, 10 * SEGMENT + 7],
    ids=lambda n: f"{n}-bytes",
)
def test_round_trip_returns_the_same_bytes(size: int) -> None:
    payload = os.urandom(size)
    assert open_archive(seal(payload)) == payload


def test_empty_input_is_one_empty_last_segment() -> None:
    archive = seal(b"")
    assert segments(archive) == [segments(archive)[0]]
    assert len(segments(archive)[0]) == TAG_SIZE
    assert open_archive(archive) == b""


def test_input_of_exactly_one_segment_makes_one_segment() -> None:
    assert len(segments(seal(os.urandom(SEGMENT)))) == 1


def test_writes_in_odd_sized_pieces_make_the_same_segments() -> None:
    payload = os.urandom(5 * SEGMENT + 3)
    out = io.BytesIO()
    with ArchiveWriter(out, make_header(), KEY) as writer:
        for start in range(0, len(payload), 13):
            writer.write(payload[start : start + 13])
    assert open_archive(out.getvalue()) == payload
    assert len(segments(out.getvalue())) == 6


def test_header_round_trips_through_the_archive() -> None:
    header = make_header()
    parsed = read_header(io.BytesIO(seal(b"x", header)))
    assert parsed.header == header


def test_default_segment_size_round_trip() -> None:
    payload = os.urandom((1 << 20) * 2 + 5)
    header = make_header(segment_size=1 << 20)
    assert open_archive(seal(payload, header)) == payload


def test_verify_checks_without_output() -> None:
    archive = seal(b"hello" * 100)
    stream = io.BytesIO(archive)
    assert verify(stream, read_header(stream), KEY) == 500


def test_wrong_key_fails_on_the_header() -> None:
    with pytest.raises(HeaderError, match="header authentication failed"):
        open_archive(seal(b"secret"), key=bytes(32))


@pytest.mark.parametrize("offset", [8, 14, 20, 27, 35])
def test_editing_any_header_byte_is_detected(offset: int) -> None:
    archive = bytearray(seal(os.urandom(3 * SEGMENT)))
    archive[offset] ^= 0x01
    with pytest.raises(ArchiveError):
        open_archive(bytes(archive))


def test_changing_the_backup_id_fails_header_authentication() -> None:
    archive = seal(b"payload", make_header("backup-1"))
    forged = archive.replace(b"backup-1", b"backup-2", 1)
    with pytest.raises(HeaderError, match="tampered"):
        open_archive(forged)


def test_editing_the_header_tag_is_detected() -> None:
    archive = bytearray(seal(b"payload"))
    archive[header_size(bytes(archive)) - 1] ^= 0x80
    with pytest.raises(HeaderError):
        open_archive(bytes(archive))


def test_not_an_archive_is_reported_as_such() -> None:
    with pytest.raises(NotAnArchiveError):
        open_archive(b"PK\x03\x04 definitely a zip file")


def test_unknown_format_version_is_refused() -> None:
    archive = bytearray(seal(b"x"))
    archive[9] = 99
    with pytest.raises(UnsupportedVersionError, match="99"):
        open_archive(bytes(archive))


def test_truncation_inside_the_header_is_detected() -> None:
    archive = seal(b"x")
    with pytest.raises(HeaderError, match="truncated"):
        open_archive(archive[:20])


def test_flipped_bit_names_the_segment() -> None:
    archive = seal(os.urandom(4 * SEGMENT))
    parts = segments(archive)
    damaged = bytearray(parts[2])
    damaged[5] ^= 0x04
    parts[2] = bytes(damaged)
    with pytest.raises(SegmentError, match="segment 2") as caught:
        open_archive(rebuild(archive, parts))
    assert caught.value.segment == 2


def test_flipped_tag_bit_in_the_last_segment_is_detected() -> None:
    archive = bytearray(seal(os.urandom(2 * SEGMENT + 10)))
    archive[-1] ^= 0x01
    with pytest.raises(SegmentError, match="segment 2"):
        open_archive(bytes(archive))


def test_truncation_at_a_segment_boundary_is_reported_as_truncation() -> None:
    archive = seal(os.urandom(4 * SEGMENT + 10))
    parts = segments(archive)
    with pytest.raises(TruncatedError, match="ends after segment 2"):
        open_archive(rebuild(archive, parts[:3]))


def test_truncation_after_the_header_is_reported_as_truncation() -> None:
    archive = seal(os.urandom(SEGMENT))
    with pytest.raises(TruncatedError, match="no segments"):
        open_archive(archive[: header_size(archive)])


def test_truncation_inside_a_segment_is_detected() -> None:
    archive = seal(os.urandom(3 * SEGMENT))
    with pytest.raises(ArchiveError, match="segment 2"):
        open_archive(archive[:-7])


def test_dropping_a_middle_segment_is_detected() -> None:
    archive = seal(os.urandom(4 * SEGMENT))
    parts = segments(archive)
    with pytest.raises(SegmentError, match="segment 1"):
        open_archive(rebuild(archive, parts[:1] + parts[2:]))


def test_dropping_the_last_segment_is_truncation() -> None:
    archive = seal(os.urandom(4 * SEGMENT))
    parts = segments(archive)
    with pytest.raises(TruncatedError):
        open_archive(rebuild(archive, parts[:-1]))


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


def test_data_appended_after_a_full_last_segment_is_reported_as_trailing_data() -> None:
    archive = seal(os.urandom(2 * SEGMENT))
    with pytest.raises(TrailingDataError):
        open_archive(archive + b"extra")


def test_data_appended_after_a_short_last_segment_is_detected() -> None:
    archive = seal(os.urandom(2 * SEGMENT + 5))
    with pytest.raises(ArchiveError, match="segment 2"):
        open_archive(archive + b"more bytes")


def test_appending_a_copy_of_the_last_segment_is_detected() -> None:
    archive = seal(os.urandom(2 * SEGMENT))
    parts = segments(archive)
    with pytest.raises(ArchiveError):
        open_archive(rebuild(archive, [*parts, parts[-1]]))


def test_splicing_a_segment_from_another_archive_with_the_same_key_is_detected() -> None:
    # Same key and same header layout: only the header digest in the aad tells them apart.
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
        writer.write(os.urandom(3 * SEGMENT))
        raise RuntimeError("source vanished")
    with pytest.raises(TruncatedError):
        open_archive(out.getvalue())


def test_data_key_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ArchiveError, match="32 bytes"):
        ArchiveWriter(io.BytesIO(), make_header(), b"short")


def test_oversized_segment_size_in_a_header_is_refused() -> None:
    archive = bytearray(seal(b"x"))
    archive[15:19] = (1 << 30).to_bytes(4, "big")
    with pytest.raises(HeaderError, match="segment size"):
        read_header(io.BytesIO(bytes(archive)))


def test_archive_does_not_contain_the_data_key_or_plaintext() -> None:
    payload = b"very recognisable plaintext " * 10
    archive = seal(payload)
    assert KEY not in archive
    assert b"recognisable" not in archive


# Segments are sealed and opened on worker threads (client.archive._Pipeline): output order,
# error order and "nothing after a failed segment" must be those of a sequential reader.


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
    out = io.BytesIO()
    with ArchiveWriter(out, make_header(), KEY) as writer:
        assert writer.readfrom(TrickleReader(payload, step)) == size
    assert out.getvalue() == seal(payload)
    assert writer.plaintext_bytes == size
    assert writer.segments_written == len(segments(out.getvalue()))


def test_many_segments_come_out_in_order_both_ways() -> None:
    payload = os.urandom(300 * SEGMENT + 17)
    archive = seal(payload)
    assert open_archive(archive) == payload
    stream = io.BytesIO(archive)
    assert b"".join(iter_plaintext(stream, read_header(stream), KEY)) == payload


def test_default_segments_on_threads_round_trip_through_files(tmp_path: Path) -> None:
    payload = os.urandom((1 << 20) * 9 + 123)
    header = make_header(segment_size=1 << 20)
    (tmp_path / "in").write_bytes(payload)
    with (
        open(tmp_path / "in", "rb", buffering=0) as source,
        open(tmp_path / "a.kms", "wb") as out,
        ArchiveWriter(out, header, KEY) as writer,
    ):
        copy_into(source, writer, 1 << 20)
    assert (tmp_path / "a.kms").read_bytes() == seal(payload, header)
    with open(tmp_path / "a.kms", "rb") as stream, open(tmp_path / "out", "wb") as out:
        assert decrypt_to(stream, read_header(stream), KEY, out) == len(payload)
    assert (tmp_path / "out").read_bytes() == payload


def test_nothing_after_a_failed_segment_is_written() -> None:
    payload = os.urandom(50 * SEGMENT)
    archive = seal(payload)
    parts = segments(archive)
    damaged = bytearray(parts[7])
    damaged[0] ^= 0x01
    parts[7] = bytes(damaged)
    stream = io.BytesIO(rebuild(archive, parts))
    out = io.BytesIO()
    with pytest.raises(SegmentError, match="segment 7"):
        decrypt_to(stream, read_header(stream), KEY, out)
    assert out.getvalue() == payload[: 7 * SEGMENT]


def test_a_failed_segment_is_reported_before_a_later_truncation() -> None:
    # Segment 3 is damaged and the archive is also cut inside a later segment: a reader
    # going one segment at a time meets segment 3 first, and so must the threaded one.
    archive = seal(os.urandom(6 * SEGMENT + 9))
    parts = segments(archive)
    damaged = bytearray(parts[3])
    damaged[-1] ^= 0x01
    parts[3] = bytes(damaged)
    parts[5] = parts[5][:5]
    with pytest.raises(SegmentError, match="segment 3"):
        open_archive(rebuild(archive, parts[:6]))


@pytest.mark.parametrize("where", [1, 10, 40])
def test_every_tampered_segment_gives_the_sequential_readers_error(where: int) -> None:
    archive = seal(os.urandom(45 * SEGMENT))
    parts = segments(archive)
    tampered = rebuild(archive, [*parts[:where], parts[where + 1], *parts[where + 1 :]])
    stream = io.BytesIO(tampered)
    with pytest.raises(ArchiveError) as sequential:
        for _ in iter_plaintext(stream, read_header(stream), KEY):
            pass
    with pytest.raises(type(sequential.value)) as threaded:
        open_archive(tampered)
    assert str(threaded.value) == str(sequential.value)


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
    out = BrokenOutput(fail_after=5)  # the header takes two writes
    with pytest.raises(OSError, match="No space"), ArchiveWriter(out, make_header(), KEY) as w:
        w.write(os.urandom(30 * SEGMENT))
    assert out.writes == 6


def test_an_output_error_while_opening_propagates() -> None:
    archive = seal(os.urandom(30 * SEGMENT))
    stream = io.BytesIO(archive)
    with pytest.raises(OSError, match="No space"):
        decrypt_to(stream, read_header(stream), KEY, BrokenOutput(fail_after=3))
