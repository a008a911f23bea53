"""Pages of rows within a caller's scope, and the page tokens that continue them."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from server.domain.errors import InvalidArgument

T = TypeVar("T")
P = TypeVar("P")

# How many rows one call reads at most to fill a page for a narrow scope.
SCOPED_SCAN_ROWS = 10_000


def scoped_page(
    fetch: Callable[[P, int], Sequence[T]],
    allowed: Callable[[T], bool],
    position: Callable[[T], P],
    after: P,
    limit: int,
    unfiltered: bool,
) -> tuple[list[T], P, bool]:
    """One page of the rows in scope, the position to continue after, and whether to.

    Rows out of scope are skipped, reading at most SCOPED_SCAN_ROWS: a page may then
    hold fewer rows than asked, with a token to continue (AIP-158 allows short pages),
    so a narrow scope over a big table never makes one call scan all of it.
    """
    if unfiltered:
        rows = list(fetch(after, limit + 1))
        more = len(rows) > limit
        return rows[:limit], position(rows[limit - 1]) if more else after, more
    kept: list[T] = []
    batch = max(limit, 100)
    scanned = 0
    while True:
        rows = list(fetch(after, batch))
        for row in rows:
            if allowed(row):
                if len(kept) == limit:
                    return kept, position(kept[-1]), True
                kept.append(row)
        scanned += len(rows)
        if len(rows) < batch:
            return kept, after, False
        after = position(rows[-1])
        if scanned >= SCOPED_SCAN_ROWS:
            return kept, after, True


def name_token(name: str) -> str:
    """The page token that continues after `name` (a key name or a backup id)."""
    return name.encode().hex()


def decode_name_token(page_token: str, names: re.Pattern[str]) -> str:
    """The name a page token continues after; only a name of the right shape is one we issued
    (a NUL in it would also break PostgreSQL's query)."""
    if not page_token:
        return ""
    try:
        name = bytes.fromhex(page_token).decode()
    except ValueError:
        name = ""
    if names.fullmatch(name) is None:
        raise InvalidArgument("PAGE_TOKEN_INVALID", "page_token is not one this server issued")
    return name
