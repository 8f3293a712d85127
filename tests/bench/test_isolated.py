"""Systems in processes of their own: same results as in-process, errors cross back as such."""

import pytest

from loraplex.bench.isolated import IsolatedSystem
from loraplex.bench.run import SystemOptions, ordinary_token_ids, run_benchmark
from loraplex.bench.workload import WorkloadSpec, make_workload
from loraplex.model.loader import read_config

SPEC = WorkloadSpec(num_requests=4, num_adapters=2, concurrency=2, prompt_len=(3, 6),
                    output_len=(2, 5), seed=3)


def test_isolated_run_generates_what_the_in_process_run_does(tiny_llama_dir):
    runs = [run_benchmark(str(tiny_llama_dir), ["loraplex", "loraplex-base"], SPEC, repeats=1,
                          rank=4, isolate=isolate) for isolate in (True, False)]
    isolated, in_process = ({name: (row["repeats"][0]["output_tokens"], row["repeats"][0]["errors"])
                             for name, row in r["points"][0]["systems"].items()} for r in runs)
    vocab = ordinary_token_ids(tiny_llama_dir, read_config(tiny_llama_dir).vocab_size)
    wanted = sum(r.max_tokens for r in make_workload(SPEC, vocab))
    assert isolated == in_process == {name: (wanted, 0) for name in isolated}
    assert runs[0]["isolated"] is True


def test_errors_in_the_child_come_back_as_themselves(tmp_path):
    system = IsolatedSystem("loraplex", SystemOptions(max_batch_size=2, max_model_len=16))
    try:
        assert system.name == "loraplex"
        with pytest.raises((ValueError, OSError)):
            system.setup(tmp_path / "no-model", [], dtype="float32")
    finally:
        system.close()
