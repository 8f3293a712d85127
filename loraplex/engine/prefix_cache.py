"""Automatic prefix caching: a sequence whose first tokens' keys and values are still in the KV
cache (computed for an earlier or a running sequence) takes those blocks instead of computing
them again. A chat's next turn repeats the whole conversation so far: only the new message and
the last, partly filled block are computed.

What is found: full KV blocks, by a hash chain. Block i's hash covers block i-1's hash, the
namespace and block i's token ids, so one hash stands for every token from position 0 to the
block's end. The namespace is everything else that decides a block's keys and values in this
engine (the model and dtype are the engine's own): the tenant (`Sequence.cache_key`, opaque)
and the adapter version (`adapter_id`; None for the base model). Hence:
- a new adapter version never finds an old version's blocks (they hold other keys and values:
  vLLM issue #42125 is that bug);
- a tenant never finds another tenant's blocks, not even on the base model with the same
  prompt: a faster first token would tell it what another tenant's prompts begin with.

The hash is blake2b (128 bits) over an unambiguous encoding. Python's hash() of a tuple would be
cheaper but is not collision resistant: a tenant could craft a block that collides with another
tenant's and be handed that tenant's keys and values. blake2b makes an accidental collision
negligible (about 2**-64 at 2**32 blocks) and a crafted one infeasible.

When a block becomes findable: once its KV is computed and it is full, prompt and output tokens
alike (a chat's next turn finds the previous answer). The scheduler offers a sequence's blocks
at the start of every step and before it lets them go (finish, preemption), so a lookup never
finds a block whose KV is still to be written. A block that no sequence references stays
findable until it is evicted, least recently used first, only when no plain free block is left
(engine/block_manager.py).

A lookup leaves at least one token to compute (its logits give the next token), and is made
only by a sequence with nothing computed (a new one, or one preempted), before it is admitted.
"""

import hashlib
from array import array
from dataclasses import dataclass

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.sequence import Sequence

HASH_BYTES = 16
ROOT_HASH = bytes(HASH_BYTES)  # the "parent" of a sequence's first block


@dataclass
class KeyHits:
    """One cache key's (tenant's) lookups."""

    queried_tokens: int = 0  # tokens sequences of this key needed in their KV cache on admission
    hit_tokens: int = 0  # of those, found in the cache (not computed)


def _namespace(seq: Sequence) -> bytes:
    # repr() of a (str, int | None) tuple is unambiguous: quotes inside the key are escaped.
    return hashlib.blake2b(repr((seq.cache_key, seq.adapter_id)).encode(),
                           digest_size=HASH_BYTES).digest()


def block_hash(parent: bytes, namespace: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block: every input has a fixed width, so none is ambiguous."""
    data = parent + namespace + array("q", token_ids).tobytes()
    return hashlib.blake2b(data, digest_size=HASH_BYTES).digest()


class PrefixCache:
    def __init__(self, blocks: BlockManager, enabled: bool):
        self.blocks = blocks
        self.enabled = enabled
        self.hits: dict[str, KeyHits] = {}  # per cache key; empty when disabled

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks of `seq`'s longest cached prefix, leaving at least its last token
        to compute; [] when disabled. Takes nothing (see `take`)."""
        if not self.enabled:
            return []
        max_blocks = (seq.num_tokens - 1) // self.blocks.block_size
        self._hash_blocks(seq, max_blocks)
        hit = []
        for h in seq.block_hashes[:max_blocks]:
            block = self.blocks.cached.get(h)
            if block is None:
                break  # a chain: no later block can match if this one does not
            hit.append(block)
        return hit

    def take(self, seq: Sequence, hit: list[int]) -> None:
        """Admit `seq` with its prefix `hit` (from `match` in the same step) and count the
        lookup for its key."""
        self.blocks.share(seq, hit)
        if self.enabled:
            counts = self.hits.setdefault(seq.cache_key, KeyHits())
            counts.queried_tokens += seq.num_tokens
            counts.hit_tokens += seq.num_computed_tokens

    def cache_computed(self, seq: Sequence) -> None:
        """Make `seq`'s full blocks whose KV is computed findable (those not yet offered)."""
        full = seq.num_computed_tokens // self.blocks.block_size
        if not self.enabled or full <= seq.num_cached_blocks:
            return
        self._hash_blocks(seq, full)
        for i in range(seq.num_cached_blocks, full):
            self.blocks.cache(seq.block_table[i], seq.block_hashes[i])
        seq.num_cached_blocks = full

    def _hash_blocks(self, seq: Sequence, num_blocks: int) -> None:
        """Extend `seq.block_hashes` to its first `num_blocks` blocks."""
        if len(seq.block_hashes) >= num_blocks:
            return
        size, tokens, namespace = self.blocks.block_size, seq.token_ids, _namespace(seq)
        parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
        for i in range(len(seq.block_hashes), num_blocks):
            parent = block_hash(parent, namespace, tokens[i * size:(i + 1) * size])
            seq.block_hashes.append(parent)

    def stats(self) -> dict:
        """Totals (numbers add up across engine replicas) and the lookups per cache key."""
        per_key = {key: {"queried_tokens": h.queried_tokens, "hit_tokens": h.hit_tokens,
                         "hit_rate": h.hit_tokens / max(1, h.queried_tokens)}
                   for key, h in self.hits.items()}
        return {
            "prefix_cache_blocks": len(self.blocks.cached),
            "prefix_cache_queried_tokens": sum(h.queried_tokens for h in self.hits.values()),
            "prefix_cache_hit_tokens": sum(h.hit_tokens for h in self.hits.values()),
            "prefix_cache": per_key,
        }
