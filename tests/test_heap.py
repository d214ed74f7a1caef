"""`order_saga.heap.settle`: a started process's objects frozen, young collections rarer."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from order_saga import heap


@pytest.fixture
def restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored")
def test_settle_freezes_what_exists_and_collects_the_young_less_often() -> None:
    _, middle, old = gc.get_threshold()
    before = gc.get_freeze_count()

    heap.settle()

    assert gc.get_freeze_count() > before
    assert gc.get_threshold() == (heap.YOUNG, middle, old)
    assert heap.YOUNG > 700  # Python's default
    assert gc.isenabled()  # cycles are still collected
