"""The paged KV cache's bookkeeping: which fixed-size blocks each sequence holds, and which full
blocks the prefix cache (engine/prefix_cache.py) can hand to another sequence."""

from collections import OrderedDict
from collections.abc import Collection

from loraplex.engine.sequence import Sequence


class BlockManager:
    """Hands out KV cache blocks of `block_size` tokens.

    Invariant: every block is exactly one of
    - free: in `free_blocks`, holding nothing anyone can find;
    - cached and free: in `evictable` (least recently used first), its contents findable by hash
      in `cached`, referenced by no sequence;
    - referenced: in the block tables of `ref_counts[block]` >= 1 running sequences (more than
      one only if it is in `cached`: sequences share a block only through the prefix cache).
    A referenced block is never handed out. A cached block becomes free only when it is the
    least recently used one and `free_blocks` is empty (it leaves `cached` then).
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # popped from the end
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self.ref_counts = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # block hash -> the block holding those tokens' KV
        self.block_hash: dict[int, bytes] = {}  # the inverse of `cached`

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or cached and unreferenced)."""
        return len(self.free_blocks) + len(self.evictable)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_new_tokens` more tokens in its KV cache."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hit: Collection[int] = ()) -> bool:
        """Whether `seq` can get room for `num_new_tokens` more tokens; with `hit`, the cached
        blocks it is about to take first (`num_new_tokens` counts their tokens too): those that
        no one references stop being free when it takes them."""
        in_use = sum(1 for b in hit if self.ref_counts[b] > 0)
        return self.blocks_needed(seq, num_new_tokens) - in_use <= self.num_free

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free:
            raise RuntimeError("allocate() without can_allocate(): the scheduler has a bug")
        for _ in range(needed):
            block = self._take_free()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def _take_free(self) -> int:
        """A block no one references: a plain free one, else the least recently used cached
        one (forgotten by the cache now)."""
        if self.free_blocks:
            return self.free_blocks.pop()
        block, _ = self.evictable.popitem(last=False)
        del self.cached[self.block_hash.pop(block)]
        return block

    def share(self, seq: Sequence, hit: list[int]) -> None:
        """Give `seq`, which holds no blocks, the cached blocks of its prefix `hit` (their KV is
        computed: they count as its computed tokens)."""
        if seq.block_table:
            raise RuntimeError("share() with blocks already held: the scheduler has a bug")
        for block in hit:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hit)
        seq.num_computed_tokens = len(hit) * self.block_size
        seq.num_cached_blocks = len(hit)

    def cache(self, block: int, block_hash: bytes) -> None:
        """Make a full, computed, referenced block findable by its hash. If another block
        already holds the same tokens (a sibling computed them in the same step), that one
        stays the cached copy and this one is freed as a plain block in time."""
        if block_hash not in self.cached and block not in self.block_hash:
            self.cached[block_hash] = block
            self.block_hash[block] = block_hash

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; a block no one references any more becomes free, or cached
        and free if the cache knows it."""
        # Tail first: a sequence's last blocks are the least likely to be asked for again, so
        # they are put where eviction looks first.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] > 0:
                continue
            if block in self.block_hash:
                self.evictable[block] = None
            else:
                self.free_blocks.append(block)
        seq.block_table = []
        seq.num_cached_blocks = 0
