"""Workloads: seeded, and distributed as their spec says."""

import statistics
from collections import Counter

import pytest

from loraplex.bench.workload import WorkloadError, WorkloadSpec, make_workload, percentile

VOCAB = range(3, 100)


def tiny(**fields) -> WorkloadSpec:
    """Many one-token requests: distributions are checked in milliseconds."""
    return WorkloadSpec(**{"prompt_len": (1, 1), "output_len": (1, 1), **fields})


def gaps(requests) -> list[float]:
    times = [0.0] + [r.arrival_s for r in requests]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_same_spec_same_requests_and_a_new_seed_changes_them():
    spec = WorkloadSpec(num_requests=20, num_adapters=5, popularity="zipf", arrival="poisson")
    assert make_workload(spec, VOCAB) == make_workload(spec, VOCAB)
    other = make_workload(WorkloadSpec(**{**spec.__dict__, "seed": 1}), VOCAB)
    assert other != make_workload(spec, VOCAB)


def test_lengths_and_tokens_stay_in_range():
    spec = WorkloadSpec(num_requests=200, prompt_len=(5, 9), output_len=(2, 4))
    requests = make_workload(spec, VOCAB)
    assert [r.index for r in requests] == list(range(200))
    assert {len(r.prompt_ids) for r in requests} == set(range(5, 10))
    assert {r.max_tokens for r in requests} == {2, 3, 4}
    assert all(t in VOCAB for r in requests for t in r.prompt_ids)


def test_distinct_identical_and_no_adapters():
    distinct = make_workload(tiny(num_requests=12, num_adapters=4, popularity="distinct"), VOCAB)
    assert [r.adapter for r in distinct] == [0, 1, 2, 3] * 3
    identical = make_workload(tiny(num_requests=12, num_adapters=4, popularity="identical"),
                              VOCAB)
    assert {r.adapter for r in identical} == {0}
    base = make_workload(tiny(num_requests=5, num_adapters=0, popularity="zipf"), VOCAB)
    assert {r.adapter for r in base} == {None}


def test_uniform_popularity_is_flat():
    counts = Counter(r.adapter for r in make_workload(
        tiny(num_requests=8000, num_adapters=4, popularity="uniform"), VOCAB))
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(abs(c - 2000) < 200 for c in counts.values()), counts


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_zipf_popularity_falls_as_a_power_of_rank(alpha):
    counts = Counter(r.adapter for r in make_workload(
        tiny(num_requests=20000, num_adapters=8, popularity="zipf", zipf_alpha=alpha), VOCAB))
    share = [counts[k] / 20000 for k in range(8)]
    norm = sum(1 / k**alpha for k in range(1, 9))
    for k in range(8):
        expected = 1 / (k + 1) ** alpha / norm
        assert abs(share[k] - expected) < 0.1 * expected + 0.005, (k, share[k], expected)
    assert share == sorted(share, reverse=True)


def test_closed_loop_arrives_all_at_once():
    assert {r.arrival_s for r in make_workload(tiny(num_requests=10), VOCAB)} == {0.0}


@pytest.mark.parametrize("arrival, cv", [("poisson", 1.0), ("gamma", 1.0), ("gamma", 3.0),
                                         ("gamma", 0.5)])
def test_open_loop_gaps_have_the_asked_mean_and_cv(arrival, cv):
    requests = make_workload(tiny(num_requests=20000, arrival=arrival, rate=8.0, cv=cv), VOCAB)
    times = [r.arrival_s for r in requests]
    assert times == sorted(times) and times[0] > 0
    g = gaps(requests)
    mean = statistics.fmean(g)
    assert mean == pytest.approx(1 / 8.0, rel=0.05)
    assert statistics.pstdev(g) / mean == pytest.approx(cv, rel=0.1)


@pytest.mark.parametrize("fields, message", [
    ({"num_requests": 0}, "num_requests"),
    ({"num_adapters": -1}, "num_adapters"),
    ({"popularity": "pareto"}, "popularity"),
    ({"zipf_alpha": 0}, "zipf_alpha"),
    ({"arrival": "burst"}, "arrival"),
    ({"concurrency": 0}, "concurrency"),
    ({"rate": 0}, "rate"),
    ({"cv": -1}, "cv"),
    ({"prompt_len": (9, 3)}, "prompt_len"),
    ({"output_len": (0, 3)}, "output_len"),
])
def test_bad_specs_are_clear_errors(fields, message):
    with pytest.raises(WorkloadError, match=message):
        WorkloadSpec(**fields)


def test_empty_vocabulary_is_an_error():
    with pytest.raises(WorkloadError, match="vocab"):
        make_workload(WorkloadSpec(), [])


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile(list(range(101)), 90) == pytest.approx(90)
    assert percentile([0, 10], 99) == pytest.approx(9.9)
