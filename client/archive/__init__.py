"""The encrypted backup archive: a header, then AES-256-GCM sealed segments.

`header` reads and writes the header (format versions 1 and 2), `segments` seals and
opens version 2 segments (`v1` reads the old ones), and `tree` is the payload encoding
of files and trees. The byte layout is specified in docs/archive-format.md.
"""

from client.archive.header import (
    DATA_KEY_SIZE,
    DEFAULT_SEGMENT_SIZE,
    FORMAT_VERSION,
    MAX_SEGMENT_SIZE,
    SALT_SIZE,
    TAG_SIZE,
    ArchiveError,
    ArchiveHeader,
    Compression,
    HeaderError,
    NotAnArchiveError,
    ParsedHeader,
    PayloadError,
    PayloadKind,
    SegmentError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
    read_header,
)
from client.archive.segments import (
    DEFAULT_ZSTD_LEVEL,
    RECORD,
    ArchiveWriter,
    PlaintextReader,
    iter_segments,
    parse_compression,
)

__all__ = [
    "DATA_KEY_SIZE",
    "DEFAULT_SEGMENT_SIZE",
    "DEFAULT_ZSTD_LEVEL",
    "FORMAT_VERSION",
    "MAX_SEGMENT_SIZE",
    "RECORD",
    "SALT_SIZE",
    "TAG_SIZE",
    "ArchiveError",
    "ArchiveHeader",
    "ArchiveWriter",
    "Compression",
    "HeaderError",
    "NotAnArchiveError",
    "ParsedHeader",
    "PayloadError",
    "PayloadKind",
    "PlaintextReader",
    "SegmentError",
    "TrailingDataError",
    "TruncatedError",
    "UnsupportedVersionError",
    "iter_segments",
    "parse_compression",
    "read_header",
]
