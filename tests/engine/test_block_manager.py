"""BlockManager on its own: block counts, reference counts, and the prefix cache's LRU of
cached blocks no one holds (the engine-level invariants are in test_scheduler_properties.py)."""

import pytest

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.sequence import Sequence
from loraplex.sampling_params import SamplingParams


def _seq(num_prompt_tokens: int = 1) -> Sequence:
    return Sequence("r", 0, [1] * num_prompt_tokens, SamplingParams(), None, arrival=0)


def test_blocks_needed_rounds_up_to_whole_blocks():
    blocks = BlockManager(num_blocks=8, block_size=4)
    seq = _seq()
    assert blocks.blocks_needed(seq, 1) == 1
    assert blocks.blocks_needed(seq, 4) == 1
    assert blocks.blocks_needed(seq, 5) == 2
    blocks.allocate(seq, 5)
    seq.num_computed_tokens = 5
    assert blocks.blocks_needed(seq, 3) == 0  # fits in the second block's free rows
    assert blocks.blocks_needed(seq, 4) == 1
    assert blocks.blocks_needed(seq, 0) == 0


def test_allocate_free_round_trip():
    blocks = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(), _seq()
    blocks.allocate(a, 9)
    blocks.allocate(b, 4)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert not set(a.block_table) & set(b.block_table)
    assert blocks.num_free == 4
    blocks.free(a)
    blocks.free(b)
    assert a.block_table == [] and b.block_table == []
    assert sorted(blocks.free_blocks) == list(range(8))
    assert blocks.ref_counts == [0] * 8


def test_allocate_beyond_capacity_raises():
    blocks = BlockManager(num_blocks=2, block_size=4)
    seq = _seq()
    assert blocks.can_allocate(seq, 8)
    assert not blocks.can_allocate(seq, 9)
    with pytest.raises(RuntimeError, match="can_allocate"):
        blocks.allocate(seq, 9)
    assert blocks.num_free == 2 and seq.block_table == []  # a refused allocation takes nothing


def _cached_seq(blocks: BlockManager, num_blocks: int, tag: bytes) -> Sequence:
    """A sequence holding `num_blocks` full blocks, each cached under tag + its index."""
    seq = _seq(num_blocks * blocks.block_size)
    blocks.allocate(seq, num_blocks * blocks.block_size)
    for i, block in enumerate(seq.block_table):
        blocks.cache(block, tag + bytes([i]))
    return seq


def test_a_shared_block_is_freed_only_by_its_last_holder():
    blocks = BlockManager(num_blocks=4, block_size=4)
    a = _cached_seq(blocks, 2, b"a")
    b = _seq(9)
    blocks.share(b, a.block_table)
    assert b.num_computed_tokens == 8 and b.block_table == a.block_table
    assert blocks.ref_counts[a.block_table[0]] == 2
    blocks.free(a)
    assert blocks.num_free == 2 and not blocks.evictable  # still held by b
    blocks.free(b)
    assert blocks.num_free == 4 and len(blocks.evictable) == 2  # cached and free, findable
    assert len(blocks.cached) == 2


def test_cached_blocks_are_evicted_only_when_no_plain_block_is_left_oldest_first():
    blocks = BlockManager(num_blocks=5, block_size=4)
    old, new = _cached_seq(blocks, 2, b"old"), _cached_seq(blocks, 2, b"new")
    head, tail = old.block_table
    blocks.free(old)
    blocks.free(new)
    taker = _seq(8)
    blocks.allocate(taker, 4)
    assert taker.block_table not in ([head], [tail]) and len(blocks.cached) == 4  # the plain one
    taker.num_computed_tokens = 4
    blocks.allocate(taker, 8)  # two more blocks: no plain block left, so the two oldest go
    # A freed sequence's tail is evicted before its head: it is the least likely to be asked for.
    assert taker.block_table[1:] == [tail, head]
    assert set(blocks.cached) == {b"new\x00", b"new\x01"}
    assert set(blocks.block_hash) == set(blocks.evictable)


def test_taking_a_cached_block_renews_it_in_the_lru():
    blocks = BlockManager(num_blocks=2, block_size=4)
    first, second = _cached_seq(blocks, 1, b"1"), _cached_seq(blocks, 1, b"2")
    first_block, second_block = first.block_table[0], second.block_table[0]
    blocks.free(first)
    blocks.free(second)
    again = _seq(5)
    blocks.share(again, [first_block])  # `first`'s block is the most recently used now
    blocks.free(again)
    taker = _seq(4)
    blocks.allocate(taker, 4)
    assert taker.block_table == [second_block]


def test_can_allocate_counts_the_hit_blocks_no_one_holds():
    blocks = BlockManager(num_blocks=3, block_size=4)
    cached = _cached_seq(blocks, 2, b"c")
    hit = list(cached.block_table)
    seq = _seq(12)
    # Held by `cached`: taking them costs nothing, one free block is left for the last 4 tokens.
    assert blocks.can_allocate(seq, 12, hit)
    assert not blocks.can_allocate(seq, 13, hit)
    blocks.free(cached)
    # No one holds them now: they count as free, and stop being free once taken.
    assert blocks.num_free == 3
    assert blocks.can_allocate(seq, 12, hit)
    assert not blocks.can_allocate(seq, 13, hit)


def test_a_second_copy_of_a_cached_block_stays_a_plain_block():
    # Two siblings that computed the same prompt in the same step: the first copy is cached.
    blocks = BlockManager(num_blocks=2, block_size=4)
    a, b = _seq(4), _seq(4)
    blocks.allocate(a, 4)
    blocks.allocate(b, 4)
    blocks.cache(a.block_table[0], b"same")
    blocks.cache(b.block_table[0], b"same")
    assert blocks.cached == {b"same": a.block_table[0]}
    copy = b.block_table[0]
    blocks.free(b)
    assert blocks.free_blocks == [copy] and not blocks.evictable  # not findable: plain free
