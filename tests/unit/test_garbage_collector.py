"""kms-server's collector settings once it has started (server.main): less often, never off."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from server.main import GC_YOUNG_THRESHOLD, settle_garbage_collector


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector_restored")
def test_cycles_made_after_start_up_are_still_collected_without_being_asked() -> None:
    settle_garbage_collector()
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0  # start-up's objects are out of every collection
    collected = gc.get_stats()[0]["collected"]
    for _ in range(3 * GC_YOUNG_THRESHOLD):
        cycle: list[object] = []
        cycle.append(cycle)
    del cycle
    # The youngest generation was collected by itself, and found the cycles.
    assert gc.get_stats()[0]["collected"] - collected >= GC_YOUNG_THRESHOLD
