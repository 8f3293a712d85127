"""summarize: throughput and latency figures from hand-made records."""

import pytest

from loraplex.bench.metrics import summarize
from loraplex.bench.system import RequestRecord


def records() -> list[RequestRecord]:
    return [
        RequestRecord(0, 0, prompt_tokens=10, arrival_s=0.0, start_s=0.0,
                      token_times_s=[0.1, 0.2, 0.4]),
        RequestRecord(1, None, prompt_tokens=6, arrival_s=0.5, start_s=0.55,
                      token_times_s=[0.8, 0.9]),
        RequestRecord(2, 1, prompt_tokens=99, arrival_s=0.5, start_s=0.5, token_times_s=[0.6],
                      error="boom"),
    ]


def test_record_properties():
    first, second, _ = records()
    assert first.output_tokens == 3 and first.ttft_s == pytest.approx(0.1)
    assert first.itl_s == pytest.approx([0.1, 0.2])
    assert second.ttft_s == pytest.approx(0.3)  # from arrival, not from start
    assert RequestRecord(3, None, 1, 0.0, 0.0).ttft_s is None


def test_summarize_hand_made_records():
    s = summarize(records(), wall_s=2.0)
    assert (s["requests"], s["completed"], s["errors"]) == (3, 2, 1)
    assert s["output_tokens"] == 5 and s["prompt_tokens"] == 16  # failed ones count nowhere
    assert s["requests_per_s"] == pytest.approx(1.0)
    assert s["output_tokens_per_s"] == pytest.approx(2.5)
    assert s["total_tokens_per_s"] == pytest.approx(10.5)
    assert s["ttft_ms_p50"] == pytest.approx(200)  # 100 and 300 ms
    assert s["ttft_ms_p99"] == pytest.approx(298)
    assert s["itl_ms_p50"] == pytest.approx(100)  # 100, 200, 100 ms
    assert s["itl_ms_p90"] == pytest.approx(180)
    assert s["latency_ms_p50"] == pytest.approx(400)  # 400 and 400 ms


def test_all_failed_gives_no_percentiles():
    s = summarize([RequestRecord(0, None, 3, 0.0, 0.0, error="x")], wall_s=1.0)
    assert s["errors"] == 1 and s["output_tokens_per_s"] == 0
    assert s["ttft_ms_p50"] is None and s["itl_ms_p99"] is None


def test_wall_time_must_be_positive():
    with pytest.raises(ValueError, match="wall_s"):
        summarize(records(), wall_s=0)
