"""Who runs this step: continuous batching with chunked prefill, KV blocks and adapter slots.

Every step spends a budget of `max_num_batched_tokens`: first on the running sequences (oldest
first; a decoding sequence needs one token, a prompt being prefilled takes a chunk), then on
waiting ones in arrival order. When KV blocks run out, the newest running sequence is preempted:
its blocks are freed and it is recomputed later; nothing is ever dropped.
"""

from collections import deque
from dataclasses import dataclass

from loraplex.config import EngineConfig
from loraplex.engine.adapter_manager import AdapterManager
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed for it this step (1 when decoding)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, adapters: AdapterManager):
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.step_count = 0
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[ScheduledSeq], list[Sequence]]:
        """Returns this step's work and the sequences that failed (e.g. a broken adapter)."""
        self.step_count += 1
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        failed: list[Sequence] = []
        preempted = False

        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num == 0:
                continue
            while not self.blocks.can_allocate(seq, num):
                victim = max(
                    (s for s in self.running if s.status is SequenceStatus.RUNNING),
                    key=lambda s: s.arrival,
                )
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.blocks.allocate(seq, num)
            if seq.slot >= 0:
                self.adapters.touch(seq.slot, self.step_count)
            scheduled.append(ScheduledSeq(seq, num))
            budget -= num

        # Admit waiting sequences in arrival order; none while we are short of memory.
        in_use = {s.adapter_id for s in self.running if s.adapter is not None}
        for seq in list(self.waiting) if not preempted else []:
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            slot = -1
            if seq.adapter is not None:
                problem = self.adapters.poll(seq.adapter)
                if problem == "loading":
                    continue  # others go ahead; this one is admitted once its load finishes
                if problem is not None:
                    self.waiting.remove(seq)
                    seq.error = problem
                    failed.append(seq)
                    continue
                acquired = self.adapters.acquire_slot(seq.adapter_id, in_use, self.step_count)
                if acquired is None:
                    continue  # waits for a slot to drain; later requests may still run
                slot = acquired
            num = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.can_allocate(seq, num):
                break  # FCFS: the head of the queue keeps its turn for memory
            self.waiting.remove(seq)
            self.blocks.allocate(seq, num)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seq.slot = slot
            if seq.adapter is not None:
                in_use.add(seq.adapter_id)
            scheduled.append(ScheduledSeq(seq, num))
            budget -= num
        self.adapters.release_reservations(
            {s.adapter_id for s in self.waiting if s.adapter is not None}
        )
        return scheduled, failed

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV cache; it re-enters the queue by arrival order."""
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        seq.slot = -1
        self.num_preemptions += 1
        index = next((i for i, s in enumerate(self.waiting) if s.arrival > seq.arrival),
                     len(self.waiting))
        self.waiting.insert(index, seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence from wherever it is and free what it holds."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq)
            seq.slot = -1
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
