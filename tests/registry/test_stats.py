import threading

import pytest


def record(registry, version_id, *, error=False, latency_ms=100.0, ttft_ms=10.0):
    registry.record_request(
        version_id,
        prompt_tokens=5,
        completion_tokens=7,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        error=error,
    )


def test_version_stats(registry, push):
    v1, v2, v3 = push(seed=1), push(seed=2), push(seed=3)
    record(registry, v1.id, latency_ms=100.0, ttft_ms=10.0)
    record(registry, v1.id, latency_ms=300.0, ttft_ms=30.0, error=True)
    record(registry, v2.id)
    stats = registry.version_stats("acme", "bot")
    assert stats[0] == {
        "version_id": v1.id,
        "version": "v1",
        "requests": 2,
        "errors": 1,
        "prompt_tokens": 10,
        "completion_tokens": 14,
        "mean_latency_ms": pytest.approx(200.0),
        "mean_ttft_ms": pytest.approx(20.0),
    }
    assert stats[1]["requests"] == 1
    assert stats[2] == {
        "version_id": v3.id,
        "version": "v3",
        "requests": 0,
        "errors": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "mean_latency_ms": None,
        "mean_ttft_ms": None,
    }


def test_recording_from_many_threads(registry, push):
    version = push()

    def worker():
        for _ in range(50):
            record(registry, version.id)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.version_stats("acme", "bot")[0]["requests"] == 400
