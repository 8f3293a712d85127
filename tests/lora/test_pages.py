"""The page pool's invariants under random allocate / free / compact sequences (hypothesis)."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from loraplex.lora.pages import PageError, PagePool, pages_for

NUM_PAGES = 24


class PagePoolMachine(RuleBasedStateMachine):
    """A pool of 24 pages and a model of it: which page each owner holds, and the bytes (owner
    ids) the pages would hold, moved as compact says."""

    def __init__(self):
        super().__init__()
        self.pool = PagePool(NUM_PAGES)
        self.memory = [None] * NUM_PAGES  # page -> owner whose data it holds

    @rule(owner=st.integers(0, 11), count=st.integers(1, 8))
    def allocate(self, owner, count):
        if owner in self.pool.runs:
            with pytest.raises(PageError):
                self.pool.allocate(owner, count)
            return
        longest = max((length for _, length in self.pool.gaps()), default=0)
        first = self.pool.allocate(owner, count)
        # Fragmentation: None exactly when no gap is long enough, even if enough pages are free.
        assert (first is None) == (longest < count)
        if first is None and self.pool.can_allocate(count):
            self.compact()
            first = self.pool.allocate(owner, count)
            assert first is not None  # compacted, every free page is in one gap
        if first is not None:
            assert all(self.memory[p] is None for p in range(first, first + count))
            self.memory[first:first + count] = [owner] * count

    @rule(owner=st.integers(0, 11))
    def free(self, owner):
        if owner in self.pool.runs:
            first, count = self.pool.runs[owner]
            self.memory[first:first + count] = [None] * count
        self.pool.free(owner)

    @rule()
    def compact(self):
        for move in self.pool.compact():  # applied in order, as AdapterSlots does
            assert move.target < move.source
            data = self.memory[move.source:move.source + move.count]
            assert data == [move.owner] * move.count  # never a page another move overwrote
            self.memory[move.source:move.source + move.count] = [None] * move.count
            self.memory[move.target:move.target + move.count] = data
        assert len(self.pool.gaps()) <= 1 and self.pool.num_used == sum(
            count for _, count in self.pool.runs.values())
        if self.pool.runs:
            assert max(f + c for f, c in self.pool.runs.values()) == self.pool.num_used

    @invariant()
    def no_page_owned_twice_and_free_plus_used_is_total(self):
        owned = [None] * NUM_PAGES
        for owner, (first, count) in self.pool.runs.items():
            assert 0 <= first and first + count <= NUM_PAGES and count >= 1
            for page in range(first, first + count):
                assert owned[page] is None, f"page {page} owned twice"
                owned[page] = owner
        assert owned == self.memory  # each owner's data is where its run says
        assert self.pool.num_free + self.pool.num_used == NUM_PAGES
        assert self.pool.num_free == owned.count(None) == sum(c for _, c in self.pool.gaps())


TestPagePool = PagePoolMachine.TestCase
TestPagePool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_pages_for_rounds_a_rank_up_to_whole_pages():
    assert [pages_for(r, 8) for r in (1, 8, 9, 16, 64)] == [1, 1, 2, 2, 8]
    with pytest.raises(PageError):
        PagePool(0)
    with pytest.raises(PageError):
        PagePool(4).allocate(0, 0)
