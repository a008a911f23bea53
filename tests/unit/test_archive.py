"""The archive format on its own: round trips and every kind of tampering."""

from __future__ import annotations

import io
import os

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
    decrypt_to,
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
