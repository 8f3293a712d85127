"""run_benchmark: every system set up once, run in rotating order, medians kept; the report
files it writes. Fake systems keep it to milliseconds."""

import json
import sys

import pytest

from loraplex.bench import run as bench_run
from loraplex.bench.loraplex_systems import BASELINE_NAME
from loraplex.bench.report import markdown_table
from loraplex.bench.run import SYSTEMS, BenchError, SystemOptions, run_benchmark
from loraplex.bench.system import RequestRecord
from loraplex.bench.workload import WorkloadSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeSystem:
    """Answers every request at once with `speed` tokens per millisecond of fake time."""

    def __init__(self, name: str, calls: list, speed: float, options: SystemOptions,
                 fail_setup: bool = False):
        self.name, self.calls, self.speed, self.options = name, calls, speed, options
        self.fail_setup = fail_setup
        self.num_adapters = None

    def setup(self, model_dir, adapters, *, dtype):
        self.calls.append(("setup", self.name))
        if self.fail_setup:
            raise RuntimeError("no such device")
        self.num_adapters = len(adapters)
        assert all((a / "adapter_model.safetensors").is_file() for a in adapters)

    def run(self, requests):
        self.calls.append(("run", self.name))
        return [RequestRecord(r.index, r.adapter, len(r.prompt_ids), r.arrival_s, r.arrival_s,
                              [r.arrival_s + (k + 1) / (1e3 * self.speed)
                               for k in range(r.max_tokens)]) for r in requests]

    def stats(self):
        return {"slot_hits": 2, "slot_misses": 1}

    def close(self):
        self.calls.append(("close", self.name))


@pytest.fixture
def fakes(monkeypatch):
    calls = []
    for key, name, speed in (("loraplex", "fast", 2.0), ("loraplex-base", BASELINE_NAME, 4.0),
                             ("loraplex-http", "slow", 1.0)):
        monkeypatch.setitem(SYSTEMS, key, lambda o, n=name, s=speed: FakeSystem(n, calls, s, o))
    return calls


def specs(*num_adapters, **fields):
    return [WorkloadSpec(num_requests=6, num_adapters=n, concurrency=2, prompt_len=(2, 5),
                         output_len=(2, 3), **fields) for n in num_adapters]


def test_systems_alternate_in_rotating_order(fakes, tiny_llama_dir, tmp_path):
    results = run_benchmark(str(tiny_llama_dir), ["loraplex", "loraplex-base", "loraplex-http"],
                            specs(1, 3), repeats=3, out_dir=tmp_path)
    setups = [c for c in fakes if c[0] == "setup"]
    assert setups == [("setup", "fast"), ("setup", BASELINE_NAME), ("setup", "slow")]
    runs = [c[1] for c in fakes if c[0] == "run"]
    one_point = ["fast", BASELINE_NAME, "slow", BASELINE_NAME, "slow", "fast", "slow", "fast",
                 BASELINE_NAME]
    assert runs == one_point * 2
    assert [c for c in fakes if c[0] == "close"] == [("close", n) for n in ("fast", BASELINE_NAME,
                                                                            "slow")]
    assert [s["name"] for s in results["systems"]] == ["fast", BASELINE_NAME, "slow"]
    point = results["points"][1]
    assert point["spec"]["num_adapters"] == 3
    fast = point["systems"]["fast"]
    assert len(fast["repeats"]) == 3 and fast["median"]["slot_hits"] == 2
    assert fast["median"]["errors"] == 0 and len(fast["ttft_ms"]) == 3 * 6
    assert fast["median"]["ttft_ms_p50"] == pytest.approx(0.5)
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch"]


def test_report_files(fakes, tiny_llama_dir, tmp_path):
    results = run_benchmark(str(tiny_llama_dir), ["loraplex", "loraplex-base"], specs(1, 2, 4),
                            repeats=2, out_dir=tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["results.json", "results.md", "throughput_vs_adapters.png", "ttft_cdf.png"]
    assert sorted(results["files"]) == sorted(str(tmp_path / "out" / n) for n in names)
    for png in ("throughput_vs_adapters.png", "ttft_cdf.png"):
        assert (tmp_path / "out" / png).read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["points"][2]["spec"]["num_adapters"] == 4 and saved["repeats"] == 2
    assert set(saved["points"][0]["systems"]) == {"fast", BASELINE_NAME}
    table = (tmp_path / "out" / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| fast |")]
    assert len(rows) == 3
    for row, point in zip(rows, results["points"], strict=True):
        fast, base = (point["systems"][n]["median"]["output_tokens_per_s"]
                      for n in ("fast", BASELINE_NAME))
        assert f"| {fast / base:.2f}x |" in row
    assert table.count(f"| {BASELINE_NAME} |") == 3 and "1.00x" in table
    assert markdown_table(results) in table


def test_one_workload_writes_no_sweep_plot(fakes, tiny_llama_dir, tmp_path):
    results = run_benchmark(str(tiny_llama_dir), ["loraplex-http"], specs(2)[0], repeats=1,
                            out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md",
                                                         "ttft_cdf.png"]
    assert "| slow | 2 |" in markdown_table(results) and "| - |" in markdown_table(results)


def test_a_failed_setup_is_one_clear_error_and_closes_the_others(fakes, monkeypatch,
                                                                  tiny_llama_dir):
    monkeypatch.setitem(SYSTEMS, "loraplex-http",
                        lambda o: FakeSystem("broken", fakes, 1.0, o, fail_setup=True))
    with pytest.raises(BenchError, match="loraplex-http: setup failed: no such device"):
        run_benchmark(str(tiny_llama_dir), ["loraplex", "loraplex-http"], specs(1))
    assert ("close", "fast") in fakes and ("close", "broken") in fakes


@pytest.mark.parametrize("systems, kwargs, message", [
    (["nope"], {}, "unknown system 'nope'"),
    ([], {}, "no systems"),
    (["loraplex", "loraplex"], {}, "given twice"),
    (["loraplex"], {"repeats": 0}, "repeats"),
    (["loraplex"], {"rank": 0}, "rank"),
    (["loraplex"], {"max_cpu_loras": 0}, "max_cpu_loras"),
])
def test_bad_arguments(systems, kwargs, message, tiny_llama_dir):
    with pytest.raises(BenchError, match=message):
        run_benchmark(str(tiny_llama_dir), systems, specs(1), **kwargs)


def test_mixed_concurrency_is_refused(tiny_llama_dir):
    with pytest.raises(BenchError, match="concurrency"):
        run_benchmark(str(tiny_llama_dir), ["loraplex"],
                      [WorkloadSpec(concurrency=2), WorkloadSpec(concurrency=3)])


def test_missing_peers_name_the_extra(monkeypatch):
    import loraplex.bench

    monkeypatch.setitem(sys.modules, "loraplex.bench.peers", None)  # import fails
    monkeypatch.delattr(loraplex.bench, "peers", raising=False)  # even if imported before
    with pytest.raises(BenchError, match=r"loraplex\[bench\]"):
        SYSTEMS["peft-mixed"](SystemOptions(max_batch_size=4, max_model_len=64))


def test_prompt_tokens_skip_special_and_padding_ids(bpe_llama_dir):
    from loraplex.model.loader import read_config

    ids = bench_run.ordinary_token_ids(bpe_llama_dir, read_config(bpe_llama_dir).vocab_size)
    assert 0 not in ids and 1 not in ids and 2 not in ids  # <|endoftext|>, <|im_start|>, ...
    assert max(ids) < read_config(bpe_llama_dir).vocab_size - 16  # no padding rows
    assert len(ids) > 200


def test_without_matplotlib_the_text_report_is_still_written(fakes, monkeypatch, tiny_llama_dir,
                                                             tmp_path):
    from loraplex.bench import report

    monkeypatch.setattr(report, "can_plot", lambda: False)
    notes = []
    run_benchmark(str(tiny_llama_dir), ["loraplex"], specs(1, 2), repeats=1, out_dir=tmp_path,
                  log=notes.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]
    assert any("matplotlib" in n and "loraplex[bench]" in n for n in notes)


def test_adapters_that_cannot_be_written_are_one_clear_error(fakes, monkeypatch, tiny_llama_dir):
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("loraplex.bench.adapters.write_random_adapter", full_disk)
    with pytest.raises(BenchError, match="cannot write the benchmark's 1 adapters.*No space"):
        run_benchmark(str(tiny_llama_dir), ["loraplex"], specs(1))
