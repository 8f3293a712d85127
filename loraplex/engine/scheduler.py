"""Who runs this step: continuous batching with chunked prefill, KV blocks, adapter slots and
fair shares between tenants.

Every step spends a budget of `max_num_batched_tokens`: first one token for each decoding
sequence (they are cheap and what streaming users wait on), then prompt chunks of the running
sequences, then new sequences from the queue. Prompt chunks and admissions go to the tenant
(fairness key) with the lowest virtual token counter first (engine/fairness.py), and within a
tenant in arrival order. With `scheduling="fcfs"` every sequence has the same key: first come,
first served.

First tokens of tenants behind their share: a step that carries a prompt chunk of a tenant
holding fewer seats than its weighted share carries no prompt chunk of the tenants at or above
theirs (they run in the next step). A prompt chunk costs a step as much as many decoding tokens
(on 2 CPU cores, 128 prompt tokens took 0.5 s against 0.19 s for 16 decoding sequences), so
filling the rest of the budget with a busy tenant's prompt would make the quiet tenant's first
token wait as long again. The trade: such a step does not fill its budget, once per quiet
request (the busy tenants' prompts lose that step). A lone tenant is never behind anyone, so it
is scheduled exactly as first come, first served.

A sequence admitted with nothing computed first takes the longest prefix of its tokens found
in the prefix cache (engine/prefix_cache.py): those tokens are not computed, spend none of the
step's budget and are not charged to its tenant.

Preemption frees a running sequence's KV blocks; it is recomputed later (from the prefix cache
as far as its blocks are still there) and nothing is dropped.
Two causes, both of which take the newest sequence of the tenant furthest ahead (highest
counter):
- KV pressure: a running sequence needs a block and none is free;
- fairness: every seat (`max_num_seqs`) is taken, a tenant holding fewer seats than its weighted
  share has a request ready to run, and a tenant furthest ahead of it holds more than its share.
  At most one such preemption for each tenant below its share a step, and a sequence is
  preempted for fairness at most MAX_FAIRNESS_PREEMPTIONS times, so none is preempted without
  end.
"""

import time
from collections import Counter, deque
from dataclasses import dataclass

from loraplex.config import EngineConfig
from loraplex.engine.adapter_manager import AdapterManager
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.fairness import VirtualTokenCounter
from loraplex.engine.prefix_cache import PrefixCache
from loraplex.engine.sequence import Sequence, SequenceStatus

MAX_FAIRNESS_PREEMPTIONS = 1  # per sequence; KV-pressure preemptions are not bounded (forced)


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed for it this step (1 when decoding)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, adapters: AdapterManager):
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.fair = config.scheduling == "fair"
        self.vtc = VirtualTokenCounter(config.fairness_input_cost, config.fairness_output_cost)
        self.prefix_cache = PrefixCache(blocks, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()  # in arrival order
        self.running: list[Sequence] = []
        self.step_count = 0
        self.budget = 0  # tokens left to schedule in the step being built
        self.num_preemptions = 0
        self.num_fairness_preemptions = 0
        # The keys this step's prompt chunks were kept to (tenants behind their share), or None.
        self.prompts_kept_to: set[str] | None = None

    def add(self, seq: Sequence, weight: float = 1.0) -> None:
        if not self.fair:
            seq.fairness_key = ""  # one key for everyone: first come, first served
        self.vtc.arrive(seq.fairness_key, weight)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[ScheduledSeq], list[Sequence]]:
        """Returns this step's work and the sequences that failed (e.g. a broken adapter)."""
        self.step_count += 1
        self.budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        for seq in self.running:  # the blocks the last step filled can be found from now on
            self.prefix_cache.cache_computed(seq)
        if self.fair:
            self._preempt_for_fairness()
        preempted = self._schedule_decoding(scheduled)
        failed: list[Sequence] = []
        behind = self._behind_share() if self.fair else set()
        for keys in ([behind, None] if behind else [None]):  # None: every tenant
            before = len(scheduled)
            preempted = self._schedule_prefilling(scheduled, keys) or preempted
            # None are admitted while we are short of memory.
            failed += [] if preempted else self._admit(scheduled, keys)
            self.prompts_kept_to = keys
            if len(scheduled) > before:
                break  # this step carries a prompt of a tenant behind its share: no others
        self.adapters.release_reservations(
            {s.adapter_id for s in self.waiting if s.adapter is not None}
        )
        return scheduled, failed

    def _rank(self, seq: Sequence) -> tuple[float, int]:
        """Who goes first: the lowest counter, then the oldest."""
        return self.vtc.counter(seq.fairness_key), seq.arrival

    def _seat_share(self, key: str) -> float:
        """A key's weighted share of `max_num_seqs` among the keys with work."""
        return self.config.max_num_seqs * self.vtc.weight(key) / self.vtc.active_weight()

    def _behind_share(self) -> set[str]:
        """Keys holding fewer seats than their share."""
        holding = Counter(s.fairness_key for s in self.running)
        return {key for key in {s.fairness_key for s in self.waiting} | set(holding)
                if holding[key] < self._seat_share(key)}

    def _schedule_decoding(self, scheduled: list[ScheduledSeq]) -> bool:
        """One token for each decoding sequence, oldest first; returns whether KV pressure
        preempted."""
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        return self._schedule_running(scheduled, sorted(decoding, key=lambda s: s.arrival))

    def _schedule_prefilling(self, scheduled: list[ScheduledSeq], keys: set[str] | None) -> bool:
        """Prompt chunks of running sequences (of `keys`, None: all), the lowest counter first;
        returns whether KV pressure preempted."""
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1
                      and (keys is None or s.fairness_key in keys)]
        return self._schedule_running(scheduled, sorted(prefilling, key=self._rank))

    def _schedule_running(self, scheduled: list[ScheduledSeq], seqs: list[Sequence]) -> bool:
        """Give running `seqs` their tokens in order; returns whether KV pressure preempted."""
        preempted = False
        given = {id(item.seq) for item in scheduled}  # those already given blocks this step
        for seq in seqs:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num = min(seq.num_tokens - seq.num_computed_tokens, self.budget)
            if num == 0:
                continue
            while not self.blocks.can_allocate(seq, num):
                # Never one already given blocks this step; `seq` itself is a candidate.
                victim = max((s for s in self.running if id(s) not in given), key=self._rank)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.blocks.allocate(seq, num)
            if seq.slot >= 0:
                self.adapters.touch(seq.slot, self.step_count)
            self._take(scheduled, seq, num)
            given.add(id(seq))
        return preempted

    def _admit(self, scheduled: list[ScheduledSeq], keys: set[str] | None) -> list[Sequence]:
        """Admit waiting sequences (of `keys`, None: all), the lowest counter first; returns
        those that failed."""
        failed: list[Sequence] = []
        in_use = {s.adapter_id for s in self.running if s.adapter is not None}
        # ids of sequences that cannot run this step, or are not of `keys`
        passed = {id(s) for s in self.waiting if keys is not None and s.fairness_key not in keys}
        while self.budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = min((s for s in self.waiting if id(s) not in passed), key=self._rank,
                      default=None)
            if seq is None:
                break
            slot = -1
            if seq.adapter is not None:
                problem = self.adapters.poll(seq.adapter)
                if problem == "loading":
                    passed.add(id(seq))  # others go ahead; it is admitted once its load lands
                    continue
                if problem is not None:
                    self.waiting.remove(seq)
                    seq.error, seq.error_kind = problem, "request"
                    failed.append(seq)
                    continue
                acquired = self.adapters.acquire_slot(seq.adapter_id, in_use, self.step_count)
                if acquired is None:
                    passed.add(id(seq))  # waits for a slot to drain; later ones may still run
                    continue
                slot = acquired
            num = self._take_blocks(seq)
            if num is None:
                break  # the first in line keeps its turn for memory
            self.waiting.remove(seq)
            if seq.queue_seconds is None:
                seq.queue_seconds = time.monotonic() - seq.added_at
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seq.slot = slot
            if seq.adapter is not None:
                in_use.add(seq.adapter_id)
            self._take(scheduled, seq, num)
        return failed

    def _take_blocks(self, seq: Sequence) -> int | None:
        """Give a waiting `seq` its cached prefix and blocks for this step's tokens; returns how
        many tokens it computes now, or None (taking nothing) when memory is short."""
        hit = self.prefix_cache.match(seq)
        num_hit = len(hit) * self.blocks.block_size
        num = min(seq.num_tokens - num_hit, self.budget)
        if not self.blocks.can_allocate(seq, num_hit + num, hit):
            return None
        self.prefix_cache.take(seq, hit)
        # Found, not computed: no charge to the key for these prompt tokens.
        seq.num_charged_prompt_tokens = max(seq.num_charged_prompt_tokens,
                                            min(num_hit, len(seq.prompt_token_ids)))
        self.blocks.allocate(seq, num)
        return num

    def _take(self, scheduled: list[ScheduledSeq], seq: Sequence, num: int) -> None:
        """Schedule `num` tokens of `seq` and charge its key for the service."""
        scheduled.append(ScheduledSeq(seq, num))
        self.budget -= num
        # Prompt tokens are charged once: recomputing after a preemption is not new service.
        new_prompt = max(0, min(seq.num_computed_tokens + num, len(seq.prompt_token_ids))
                         - seq.num_charged_prompt_tokens)
        seq.num_charged_prompt_tokens += new_prompt
        samples = int(seq.num_computed_tokens + num == seq.num_tokens)
        self.vtc.charge(seq.fairness_key, new_prompt, samples)

    def _preempt_for_fairness(self) -> None:
        """Free seats for tenants below their share, taken from tenants above theirs (see the
        module docstring): one seat for each such tenant a step."""
        if len(self.running) < self.config.max_num_seqs or not self.waiting:
            return
        holding = Counter(s.fairness_key for s in self.running)
        share = self._seat_share
        claimants = sorted((s for s in self.waiting
                            if holding[s.fairness_key] + 1 <= share(s.fairness_key)
                            and self._is_loaded(s)), key=self._rank)
        served: set[str] = set()
        for claimant in claimants:
            if claimant.fairness_key in served:
                continue
            served.add(claimant.fairness_key)
            # >=: a tenant back from idle starts level with the lowest counter, and must still
            # get a seat; the seat shares keep this from swinging back and forth.
            below = self.vtc.counter(claimant.fairness_key)
            victims = [s for s in self.running
                       if holding[s.fairness_key] - 1 >= share(s.fairness_key)
                       and self.vtc.counter(s.fairness_key) >= below
                       and s.num_fairness_preemptions < MAX_FAIRNESS_PREEMPTIONS]
            if not victims:
                continue
            victim = max(victims, key=self._rank)
            victim.num_fairness_preemptions += 1
            self.num_fairness_preemptions += 1
            holding[victim.fairness_key] -= 1
            holding[claimant.fairness_key] += 1  # the seat is the claimant's (admitted by rank)
            self._preempt(victim)

    def _is_loaded(self, seq: Sequence) -> bool:
        return seq.adapter is None or self.adapters.poll(seq.adapter) is None

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV cache; it re-enters the queue by arrival order."""
        self._release_blocks(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        seq.slot = -1
        self.num_preemptions += 1
        index = next((i for i, s in enumerate(self.waiting) if s.arrival > seq.arrival),
                     len(self.waiting))
        self.waiting.insert(index, seq)

    def _release_blocks(self, seq: Sequence) -> None:
        """Let `seq`'s blocks go; those it computed in full stay findable in the prefix cache
        (its next turn, or its own readmission after a preemption, may take them back)."""
        self.prefix_cache.cache_computed(seq)
        self.blocks.free(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence from wherever it is and free what it holds."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release_blocks(seq)
            seq.slot = -1
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.vtc.leave(seq.fairness_key)

    def fairness(self) -> dict[str, dict]:
        """Per fairness key with work: counter, weight, sequences, and how many run now."""
        running = Counter(s.fairness_key for s in self.running)
        snapshot = self.vtc.snapshot()
        for key, entry in snapshot.items():
            entry["running"] = running[key]
        return snapshot
