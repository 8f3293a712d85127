"""Fair scheduling across tenants, on the Scheduler alone with a simulated model.

The model is simulated (each scheduled token is "computed", a decoding step yields a token) so
that hypothesis can run thousands of steps: what is tested is who gets the step, not the math.
Invariants: no tenant runs ahead of another backlogged tenant by more than the VTC bound
(scaled by the seats, see test_backlogged_tenants_stay_within_the_bound), the scheduler never
idles while work could run (work conservation), a lone tenant is scheduled exactly as first
come first served, no sequence is preempted for fairness more than once, and everything ends.
"""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.config import EngineConfig
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.scheduler import MAX_FAIRNESS_PREEMPTIONS, Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.sampling_params import SamplingParams

MAX_PROMPT = 24
MAX_OUTPUT = 12
# The engine refuses a KV cache smaller than one whole sequence (LLMEngine: kv_cache_bytes
# against max_model_len); a sequence longer than the cache could never finish.
MIN_BLOCKS = -(-(MAX_PROMPT + MAX_OUTPUT) // 4)  # at block_size 4


class NoAdapters:
    """Every request here is for the base model: the adapter manager only sees bookkeeping."""

    def release_reservations(self, waiting_ids):
        assert not waiting_ids


class Sim:
    """A scheduler driven as LLMEngine drives it, with the model replaced by counting."""

    def __init__(self, scheduling="fair", max_num_seqs=4, budget=16, num_blocks=64,
                 block_size=4, weights=None):
        # No prefix cache: every prompt here is alike, so it would turn most prompts into
        # hits; who gets the step is the question (tests/engine/test_prefix_cache.py has it).
        self.config = EngineConfig(model="unused", device="cpu", max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=budget, block_size=block_size,
                                   scheduling=scheduling, enable_prefix_caching=False)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.config, self.blocks, NoAdapters())
        self.weights = weights or {}
        self.arrivals = itertools.count()
        self.served = {}  # key -> cost-model service actually computed
        self.log = []  # per step: [(request_id, num_tokens)]
        self.prompt_done = {}  # request id -> prompt tokens computed at least once

    def add(self, key: str, prompt_len: int, max_tokens: int) -> Sequence:
        n = next(self.arrivals)
        seq = Sequence(f"{key}-{n}", 0, [1] * prompt_len,
                       SamplingParams(max_tokens=max_tokens, ignore_eos=True), None, arrival=n,
                       fairness_key=key)
        self.scheduler.add(seq, self.weights.get(key, 1.0))
        return seq

    def step(self) -> list:
        kv_preemptions = self.scheduler.num_preemptions - self.scheduler.num_fairness_preemptions
        batch, failed = self.scheduler.schedule()
        assert not failed
        if self.scheduler.num_preemptions - self.scheduler.num_fairness_preemptions == \
                kv_preemptions:  # short of memory, the scheduler admits nobody on purpose
            self.check_work_conserving(batch)
        for item in batch:
            seq = item.seq
            assert seq in self.scheduler.running, "scheduled, then preempted in the same step"
            assert len(seq.block_table) * self.blocks.block_size >= \
                seq.num_computed_tokens + item.num_tokens, "scheduled without its KV blocks"
            seq.num_computed_tokens += item.num_tokens
            # Prompt tokens count once: recomputing them after a preemption is not new service.
            high = min(seq.num_computed_tokens, len(seq.prompt_token_ids))
            new_prompt = max(0, high - self.prompt_done.get(seq.request_id, 0))
            self.prompt_done[seq.request_id] = max(high, self.prompt_done.get(seq.request_id, 0))
            output = 0
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(7)
                output = 1
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    self.scheduler.finish(seq, "length")
            cost = (self.config.fairness_input_cost * new_prompt
                    + self.config.fairness_output_cost * output)
            tenant = seq.request_id.rsplit("-", 1)[0]  # fcfs gives every sequence one key
            self.served[tenant] = self.served.get(tenant, 0) + cost
        self.log.append([(item.seq.request_id, item.num_tokens) for item in batch])
        return batch

    def check_work_conserving(self, batch) -> None:
        """Right after scheduling, nothing waits that could have run: every seat, the token
        budget, or memory is used. In a step kept to the prompts of tenants behind their share,
        that holds for those tenants' requests."""
        s = self.scheduler
        used = sum(item.num_tokens for item in batch)
        kept = s.prompts_kept_to
        waiting = [q for q in s.waiting if kept is None or q.fairness_key in kept]
        if not waiting or used >= self.config.max_num_batched_tokens:
            return
        if len(s.running) >= self.config.max_num_seqs:
            return
        first = min(waiting, key=s._rank)
        need = min(first.num_tokens, self.config.max_num_batched_tokens - used)
        assert not self.blocks.can_allocate(first, need), "idle seat, budget and memory"


requests = st.tuples(st.integers(1, MAX_PROMPT), st.integers(1, MAX_OUTPUT))


def _bound(config: EngineConfig, min_weight: float) -> float:
    """How far one backlogged tenant may get ahead of another: each seat may hold a request
    admitted just before the other tenant's turn came, and run it to its end (the paper's 2U,
    with U the cost of the largest request, for every seat)."""
    largest = (config.fairness_input_cost * MAX_PROMPT + config.fairness_output_cost * MAX_OUTPUT)
    return 2 * config.max_num_seqs * largest / min_weight


@settings(max_examples=60, deadline=None)
@given(queues=st.lists(st.lists(requests, min_size=30, max_size=60), min_size=2, max_size=3),
       weights=st.lists(st.sampled_from([1.0, 2.0]), min_size=3, max_size=3),
       seats=st.integers(1, 6), num_blocks=st.sampled_from([10, 20, 64]))
def test_backlogged_tenants_stay_within_the_bound(queues, weights, seats, num_blocks):
    # Few blocks: KV-pressure preemption, which must pick from the tenant furthest ahead too.
    keys = [f"t{i}" for i in range(len(queues))]
    sim = Sim(max_num_seqs=seats, num_blocks=num_blocks,
              weights=dict(zip(keys, weights, strict=False)))
    for key, queue in zip(keys, queues, strict=True):
        for prompt, output in queue:
            sim.add(key, prompt, output)
    bound = _bound(sim.config, min(weights))
    for _ in range(5000):
        if not sim.scheduler.has_unfinished():
            break
        sim.step()
        backlogged = {s.fairness_key for s in sim.scheduler.waiting}
        if len(backlogged) >= 2:  # the bound is about tenants that all have work waiting
            counters = [sim.scheduler.vtc.counter(k) for k in backlogged]
            assert max(counters) - min(counters) <= bound
        for seq in sim.scheduler.running:
            assert seq.num_fairness_preemptions <= MAX_FAIRNESS_PREEMPTIONS
    assert not sim.scheduler.has_unfinished(), "some request never finished"
    assert sim.blocks.num_free == sim.blocks.num_blocks
    for key in keys:  # the counter is exactly the weighted service the simulation computed
        assert sim.scheduler.vtc.counter(key) == pytest.approx(
            sim.served[key] / sim.weights[key])


def test_first_come_first_served_breaks_that_bound():
    # The invariant above is not vacuous: FCFS lets the tenant that queued first run away.
    for scheduling, breaks in (("fcfs", True), ("fair", False)):
        sim = Sim(scheduling=scheduling, max_num_seqs=2)
        for _ in range(40):
            sim.add("early", MAX_PROMPT, MAX_OUTPUT)
        sim.add("late", MAX_PROMPT, MAX_OUTPUT)
        while any(s.request_id.startswith("late") for s in sim.scheduler.waiting):
            sim.step()
        gap = sim.served["early"] - sim.served.get("late", 0)
        assert (gap > _bound(sim.config, 1.0)) is breaks, (scheduling, gap)


@settings(max_examples=40, deadline=None)
@given(arrivals=st.lists(st.tuples(st.integers(0, 6), requests), min_size=1, max_size=40),
       seats=st.integers(1, 6), num_blocks=st.integers(MIN_BLOCKS, 40))
def test_a_lone_tenant_is_scheduled_exactly_as_first_come_first_served(arrivals, seats,
                                                                       num_blocks):
    # Work conservation for one tenant: the counters never hold its work back.
    logs = []
    for scheduling in ("fair", "fcfs"):
        sim = Sim(scheduling=scheduling, max_num_seqs=seats, num_blocks=num_blocks)
        pending = list(arrivals)
        for _ in range(3000):
            while pending and pending[0][0] <= len(sim.log):
                _, (prompt, output) = pending.pop(0)
                sim.add("only", prompt, output)
            if not pending and not sim.scheduler.has_unfinished():
                break
            sim.step()
        logs.append(sim.log)
        assert not sim.scheduler.has_unfinished()
    assert logs[0] == logs[1]


def busy_on_every_seat(seats: int) -> Sim:
    """A Sim whose every seat a "busy" tenant holds, with more of its requests waiting."""
    sim = Sim(max_num_seqs=seats, budget=64)
    for _ in range(12):
        sim.add("busy", 8, MAX_OUTPUT)
    for _ in range(2):
        sim.step()
    assert len(sim.scheduler.running) == seats
    return sim


def test_a_quiet_tenant_takes_a_seat_from_the_busy_one_at_once():
    sim = busy_on_every_seat(4)
    quiet = sim.add("quiet", 8, 4)
    batch = sim.step()
    assert quiet in [item.seq for item in batch], "the quiet tenant waited for a seat"
    assert sim.scheduler.num_fairness_preemptions == 1
    victim = next(s for s in sim.scheduler.waiting if s.num_fairness_preemptions)
    assert victim.fairness_key == "busy" and victim.output_token_ids  # it had started


def test_two_quiet_tenants_arriving_together_both_get_a_seat_at_once():
    sim = busy_on_every_seat(6)
    quiet = [sim.add("quiet-a", 8, 4), sim.add("quiet-b", 8, 4)]
    batch = sim.step()
    assert all(q in [item.seq for item in batch] for q in quiet)
    assert sim.scheduler.num_fairness_preemptions == 2


def test_a_quiet_tenants_prompt_has_the_step_to_itself_then_the_busy_prompts_go():
    sim = Sim(max_num_seqs=4, budget=64)
    for _ in range(2):
        sim.add("busy", 8, MAX_OUTPUT)
    sim.step()  # busy holds two seats: its share once the quiet tenant arrives
    sim.add("busy", 8, MAX_OUTPUT)  # a seat and the budget are free for it too
    quiet = sim.add("quiet", 8, 4)
    batch = sim.step()
    prompts = [item for item in batch if item.num_tokens > 1]
    assert [item.seq for item in prompts] == [quiet], "a busy prompt shared the quiet one's step"
    assert sim.scheduler.prompts_kept_to == {"quiet"}
    batch = sim.step()  # the quiet tenant decodes now; busy prompts take the budget again
    assert any(item.num_tokens > 1 and item.seq.fairness_key == "busy" for item in batch)
    assert sim.scheduler.prompts_kept_to is None


def test_weights_split_the_service_two_to_one():
    sim = Sim(max_num_seqs=4, budget=32, weights={"gold": 2.0, "basic": 1.0})
    for _ in range(200):
        sim.add("gold", 8, 8)
        sim.add("basic", 8, 8)
    while len(sim.scheduler.waiting) > 100:  # both backlogged throughout
        sim.step()
    ratio = sim.served["gold"] / sim.served["basic"]
    assert ratio == pytest.approx(2.0, rel=0.1)


def test_no_sequence_is_preempted_for_fairness_twice():
    # Tenants arriving one after another each claim a seat; the victims are all "first".
    sim = Sim(max_num_seqs=3, budget=64)
    for _ in range(3):
        sim.add("first", 8, 40)
    sim.step()
    for i in range(6):
        sim.add(f"late{i}", 8, 40)
        sim.step()
    while sim.scheduler.has_unfinished():
        sim.step()
        for seq in sim.scheduler.running + list(sim.scheduler.waiting):
            assert seq.num_fairness_preemptions <= MAX_FAIRNESS_PREEMPTIONS
    assert sim.scheduler.num_fairness_preemptions >= 1
