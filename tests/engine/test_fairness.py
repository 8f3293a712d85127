"""The virtual token counter on its own (engine/fairness.py)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex.engine.fairness import VirtualTokenCounter


def test_service_is_charged_by_the_cost_model_and_divided_by_the_weight():
    vtc = VirtualTokenCounter(input_cost=1, output_cost=2)
    vtc.arrive("a", 1.0)
    vtc.arrive("b", 2.0)
    vtc.charge("a", input_tokens=10, output_tokens=3)
    vtc.charge("b", input_tokens=10, output_tokens=3)
    assert vtc.counter("a") == 16
    assert vtc.counter("b") == 8


def test_a_tenant_back_from_idle_banks_no_credit():
    vtc = VirtualTokenCounter(1, 2)
    vtc.arrive("busy", 1.0)
    vtc.arrive("quiet", 1.0)
    vtc.leave("quiet")  # quiet goes idle at 0 while busy keeps being served
    vtc.charge("busy", 1000, 0)
    vtc.arrive("quiet", 1.0)
    assert vtc.counter("quiet") == 1000  # lifted to the lowest active counter, not left at 0


def test_a_tenant_ahead_keeps_its_debt_when_it_returns():
    vtc = VirtualTokenCounter(1, 2)
    vtc.arrive("a", 1.0)
    vtc.arrive("b", 1.0)
    vtc.charge("a", 500, 0)
    vtc.leave("a")
    vtc.arrive("a", 1.0)
    assert vtc.counter("a") == 500  # max(own, lowest active): never lowered


def test_with_nobody_active_the_returning_tenant_starts_from_the_last_one_to_leave():
    vtc = VirtualTokenCounter(1, 2)
    vtc.arrive("a", 1.0)
    vtc.charge("a", 300, 0)
    vtc.leave("a")
    vtc.arrive("b", 1.0)
    assert vtc.counter("b") == 300


def test_only_keys_with_work_are_in_the_snapshot_and_the_active_weight():
    vtc = VirtualTokenCounter(1, 2)
    vtc.arrive("a", 3.0)
    vtc.arrive("a", 3.0)
    vtc.arrive("b", 1.0)
    vtc.leave("b")
    assert vtc.active_weight() == 3.0
    assert vtc.snapshot() == {"a": {"counter": 0.0, "weight": 3.0, "sequences": 2}}


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([1.0, 2.0, 0.5]),
                          st.booleans()), max_size=60))
def test_the_active_weight_is_the_sum_over_keys_with_work(events):
    vtc = VirtualTokenCounter(1, 2)
    for key, weight, arrives in events:
        if arrives:
            vtc.arrive(key, weight)  # a new weight for an active key replaces its old one
        elif key in vtc.keys and vtc.keys[key].num_active:
            vtc.leave(key)
        expected = sum(s.weight for s in vtc.keys.values() if s.num_active)
        assert vtc.active_weight() == pytest.approx(expected)
