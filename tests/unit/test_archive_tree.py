"""The tree encoding: a full round trip through an archive, and hostile entries refused."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest

from client.archive import (
    ArchiveHeader,
    ArchiveWriter,
    PayloadKind,
    PlaintextReader,
    iter_segments,
    read_header,
)
from client.archive.header import PayloadError
from client.archive.tree import (
    DIRECTORY,
    END,
    ENTRY,
    FILE,
    FILE_DATA,
    HARDLINK,
    SYMLINK,
    EntryReader,
    Extractor,
    Scanner,
    data_size,
    iter_entries,
    remove_tree,
)
from tests.tree_checker import HOLE, assert_same_tree, describe, make_full_tree

KEY = bytes(range(32))


def header() -> ArchiveHeader:
    return ArchiveHeader(
        backup_id="b", key_name="k", key_version=1, wrapped_data_key=b"w",
        payload_kind=PayloadKind.TREE,
    )  # fmt: skip


def archive_tree(root: Path, **options: object) -> tuple[bytes, list[str]]:
    warnings: list[str] = []
    out = io.BytesIO()
    with ArchiveWriter(out, header(), KEY) as writer:
        scanner = Scanner(writer, warn=warnings.append, **options)  # type: ignore[arg-type]
        scanner.add_tree(str(root), "")
        scanner.end()
    return out.getvalue(), warnings


def reader_of(archive: bytes) -> EntryReader:
    stream = io.BytesIO(archive)
    return EntryReader(PlaintextReader(iter_segments(stream, read_header(stream), KEY)))


def extract(
    archive: bytes, target: Path, includes: tuple[str, ...] = (), special_files: bool = True
) -> list[str]:
    warnings: list[str] = []
    target.mkdir()
    extractor = Extractor(
        str(target), warn=warnings.append, includes=includes, special_files=special_files
    )
    entries = reader_of(archive)
    while (entry := entries.next()) is not None:
        extractor.extract(entries, entry)
    extractor.finish()
    return warnings


def test_a_tree_with_one_of_everything_round_trips(tmp_path: Path) -> None:
    features = make_full_tree(tmp_path / "src", special=True)
    archive, warnings = archive_tree(tmp_path / "src", special_files=True)
    assert warnings == []
    assert extract(archive, tmp_path / "out") == []
    assert_same_tree(tmp_path / "src", tmp_path / "out")
    restored = describe(tmp_path / "out")
    assert restored["setuid"]["mode"] == 0o4755  # type: ignore[index]
    assert restored["sticky"]["mode"] == 0o1777  # type: ignore[index]
    assert restored["setgid-dir"]["mode"] == 0o2775  # type: ignore[index]
    assert restored["group-writable"]["mode"] == 0o664  # type: ignore[index]
    if features["xattr"]:
        assert restored["plain.txt"]["xattrs"] == {"user.note": b"kept\x00binary"}  # type: ignore[index]
    if features["acl"]:
        assert "system.posix_acl_access" in restored["group-writable"]["xattrs"]  # type: ignore[index]
    assert os.readlink(tmp_path / "out" / "absolute-link") == "/etc/hostname"
    assert restored["hard links"] == [["nested/hard-link", "plain.txt"]]


def test_sparse_holes_stay_holes_in_the_archive_and_on_restore(tmp_path: Path) -> None:
    make_full_tree(tmp_path / "src")
    archive, _ = archive_tree(tmp_path / "src")
    assert len(archive) < (3 << 20) + (1 << 20)  # 24 MiB of holes are not in it
    extract(archive, tmp_path / "out")
    sparse = (tmp_path / "out" / "sparse").stat()
    assert sparse.st_size == 3 * HOLE
    assert sparse.st_blocks * 512 < HOLE


def test_special_files_and_sockets_are_skipped_with_one_warning_each(tmp_path: Path) -> None:
    import socket

    root = tmp_path / "src"
    root.mkdir()
    os.mkfifo(root / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock"))
    try:
        archive, warnings = archive_tree(root)
    finally:
        server.close()
    assert len(warnings) == 2
    assert "fifo" in warnings[0] and "--special-files" in warnings[0]
    assert "sock" in warnings[1] and "socket" in warnings[1]
    assert [e.path for e in iter_entries(reader_of(archive))] == [""]


def test_excludes_match_names_at_any_depth_or_paths_from_the_top(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "a" / "cache").mkdir(parents=True)
    (root / "a" / "cache" / "x").write_bytes(b"x")
    (root / "a" / "keep.txt").write_bytes(b"k")
    (root / "a" / "drop.log").write_bytes(b"d")
    (root / "b").mkdir()
    (root / "b" / "keep.txt").write_bytes(b"k")
    archive, _ = archive_tree(root, excludes=["cache", "*.log", "b/keep.txt"])
    names = [e.path for e in iter_entries(reader_of(archive))]
    assert names == ["", "a", "a/keep.txt", "b"]


def test_include_restores_only_that_part_with_its_parents(tmp_path: Path) -> None:
    make_full_tree(tmp_path / "src")
    archive, _ = archive_tree(tmp_path / "src")
    extract(archive, tmp_path / "out", includes=("nested/deeper",))
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert names == ["nested", "nested/deeper", "nested/deeper/data.bin"]
    data = (tmp_path / "out" / "nested" / "deeper" / "data.bin").read_bytes()
    assert data == (tmp_path / "src" / "nested" / "deeper" / "data.bin").read_bytes()


def test_an_include_that_matches_nothing_is_an_error(tmp_path: Path) -> None:
    make_full_tree(tmp_path / "src")
    archive, _ = archive_tree(tmp_path / "src")
    with pytest.raises(PayloadError, match="--include no/such"):
        extract(archive, tmp_path / "out", includes=("no/such",))


def forged(*entries: bytes) -> bytes:
    """An archive whose (authentic) payload is the given raw entries."""
    out = io.BytesIO()
    with ArchiveWriter(out, header(), KEY) as writer:
        for entry in entries:
            writer.write(entry)
    return out.getvalue()


def entry(kind: bytes, path: str, extra: bytes = b"", mode: int = 0o644) -> bytes:
    name = path.encode()
    return ENTRY.pack(kind, len(name), mode, 0, 0, 0, 0, 0) + name + extra


def link_target(target: str) -> bytes:
    return struct.pack(">H", len(target.encode())) + target.encode()


NO_DATA = FILE_DATA.pack(0, 0)
END_ENTRY = ENTRY.pack(END, 0, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([entry(FILE, "../evil", FILE_DATA.pack(0, 0))], "not a plain relative path"),
        ([entry(FILE, "/etc/evil", FILE_DATA.pack(0, 0))], "not a plain relative path"),
        ([entry(FILE, "a/./b", FILE_DATA.pack(0, 0))], "not a plain relative path"),
        (
            [entry(SYMLINK, "link", link_target("/etc")), entry(FILE, "link/x", NO_DATA)],
            "parent is not a directory",
        ),
        ([entry(DIRECTORY, "d"), entry(DIRECTORY, "d")], "appears twice"),
        ([entry(FILE, "f", NO_DATA), entry(FILE, "f", NO_DATA)], "appears twice"),
        ([entry(DIRECTORY, "a"), entry(DIRECTORY, "b"), entry(FILE, "a/x", NO_DATA)], "parent"),
        ([entry(FILE, "f", FILE_DATA.pack(10, 1) + struct.pack(">QQ", 5, 10))], "extents"),
        ([entry(b"Z", "f")], "unknown entry type"),
        ([entry(FILE, "f", FILE_DATA.pack(0, 0), mode=0o170000)], "out of range"),
        ([entry(FILE, "f", FILE_DATA.pack(100, 1) + struct.pack(">QQ", 0, 100))], "ends inside"),
        ([], "ends inside an entry"),
        ([END_ENTRY, b"junk"], "data follows the end"),
    ],
    ids=[
        "dotdot",
        "absolute",
        "dot",
        "through-symlink",
        "twice",
        "file-twice",
        "out-of-order",
        "extent-past-end",
        "unknown-type",
        "mode",
        "short-data",
        "no-end",
        "after-end",
    ],
)
def test_hostile_entries_are_refused_and_nothing_escapes(
    tmp_path: Path, entries: list[bytes], message: str
) -> None:
    archive = forged(*entries, *([END_ENTRY] if entries and entries[-1] != b"junk" else []))
    if entries and entries[-1] == b"junk":
        archive = forged(*entries)
    (tmp_path / "outside").mkdir()
    with pytest.raises(PayloadError, match=message):
        extract(archive, tmp_path / "out")
    assert list((tmp_path / "outside").iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_a_hard_link_to_an_unrestored_name_is_skipped_with_a_warning(tmp_path: Path) -> None:
    archive = forged(entry(HARDLINK, "h", link_target("missing")), END_ENTRY)
    warnings = extract(archive, tmp_path / "out")
    assert warnings and "missing" in warnings[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_restore_creates_special_files_only_when_asked(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    os.mkfifo(root / "fifo")
    archive, _ = archive_tree(root, special_files=True)
    warnings = extract(archive, tmp_path / "out", special_files=False)
    assert warnings == ["warning: skipping fifo: a special file (see --special-files)"]
    assert list((tmp_path / "out").iterdir()) == []


def test_a_hard_link_through_a_symlinked_directory_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("not in the archive")
    archive = forged(
        entry(SYMLINK, "up", link_target(str(tmp_path / "outside"))),
        entry(HARDLINK, "h", link_target("up/secret")),
        END_ENTRY,
    )
    warnings = extract(archive, tmp_path / "out")
    assert warnings and "up/secret" in warnings[0]
    assert not (tmp_path / "out" / "h").exists()


def test_data_size_counts_what_a_backup_reads_for_the_eta(tmp_path: Path) -> None:
    make_full_tree(tmp_path / "src")
    total = data_size(str(tmp_path / "src"), [])
    assert 3 << 20 < total < 4 << 20  # the 24 MiB of holes are not read
    assert data_size(str(tmp_path / "src"), ["deeper"]) < 1 << 20


def test_a_device_node_that_needs_root_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = ENTRY.pack(b"C", 4, 0o600, 0, 0, 0, 0, 0) + b"null" + struct.pack(">Q", 259)
    archive = forged(device, END_ENTRY)

    def refuse(*_args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "mknod", refuse)
    warnings = extract(archive, tmp_path / "out")
    assert warnings == ["warning: skipping null: creating a device node needs root"]


def test_remove_tree_removes_read_only_directories_too(tmp_path: Path) -> None:
    (tmp_path / "staging" / "ro").mkdir(parents=True)
    (tmp_path / "staging" / "ro" / "inside").write_text("x")
    os.symlink("/etc", tmp_path / "staging" / "link")
    os.chmod(tmp_path / "staging" / "ro", 0o555)
    remove_tree(str(tmp_path / "staging"))
    assert not (tmp_path / "staging").exists()
    assert os.stat("/etc").st_mode & 0o777 != 0o700  # the symlink was not followed
