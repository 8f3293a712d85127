"""GGUF export of the default model (SmolLM2-135M) checked in llama.cpp against loraplex itself.

Run with `-s` to see the sizes, export times and logit differences the assertions are about.
"""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from loraplex import LLM, SamplingParams
from loraplex.bench.adapters import write_random_adapter
from loraplex.export.gguf import export_adapter, export_merged
from loraplex.model.loader import read_config
from loraplex.model.pull import resolve_model
from loraplex.model.tokenizer import Tokenizer
from tests.export.conftest import load_llama_cpp

pytestmark = pytest.mark.real_model

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Tell me a joke about cats."]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def files(model_dir, tmp_path_factory) -> dict[str, Path]:
    """The adapter and every export the tests read, each written once."""
    root = tmp_path_factory.mktemp("gguf")
    # Random A, B at 0.01 and scaling alpha/r = 2: every answer changes, and stays fluent.
    adapter = write_random_adapter(root / "adapter", read_config(model_dir), rank=16, seed=0)
    jobs = {
        "base": lambda out: export_merged(model_dir, out, "f32"),
        "merged": lambda out: export_merged(model_dir, out, "f32", adapter),
        "lora": lambda out: export_adapter(model_dir, adapter, out, "f32",
                                           base_gguf="./base.gguf"),
        "merged-f16": lambda out: export_merged(model_dir, out, "f16", adapter),
        "merged-q8_0": lambda out: export_merged(model_dir, out, "q8_0", adapter),
    }
    paths = {"adapter": adapter}
    for name, job in jobs.items():
        started = time.perf_counter()
        result = job(root / f"{name}.gguf")
        print(f"{name}: {result.num_bytes / 1e6:.1f} MB in {time.perf_counter() - started:.1f}s")
        paths[name] = result.gguf_path
    return paths


@pytest.fixture(scope="module")
def loraplex_runs(model_dir, files):
    """loraplex's own greedy answers, without and with the adapter: (prompts, base, adapter)."""
    llm = LLM(str(model_dir), max_lora_rank=16, max_model_len=512, kv_cache_bytes=1 << 27)
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    base = [o.token_ids for o in llm.generate(prompts, params)]
    tuned = [o.token_ids for o in llm.generate(prompts, params,
                                               adapters=[files["adapter"]] * len(prompts))]
    return prompts, base, tuned, llm.tokenizer.eos_token_ids


def llama_cpp_greedy(model_path, prompts, stop_ids, lora_path=None) -> list[list[int]]:
    """Greedy tokens from llama.cpp, stopped like loraplex: at MAX_TOKENS or an EOS, kept."""
    llm = load_llama_cpp(model_path, lora_path, n_ctx=512)
    answers = []
    for prompt in prompts:
        tokens = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if len(tokens) == MAX_TOKENS or token in stop_ids:
                break
        answers.append(tokens)
    return answers


def test_base_export_generates_like_loraplex(files, loraplex_runs):
    prompts, base, _, stop_ids = loraplex_runs
    assert llama_cpp_greedy(files["base"], prompts, stop_ids) == base


def test_merged_export_generates_like_loraplex_with_the_adapter(files, loraplex_runs):
    prompts, base, tuned, stop_ids = loraplex_runs
    assert all(b != t for b, t in zip(base, tuned, strict=True))  # the adapter is visible
    assert llama_cpp_greedy(files["merged"], prompts, stop_ids) == tuned


def test_adapter_only_on_base_generates_like_merged(files, loraplex_runs):
    prompts, _, tuned, stop_ids = loraplex_runs
    got = llama_cpp_greedy(files["base"], prompts, stop_ids, lora_path=files["lora"])
    assert got == tuned


def test_tokenizer_and_metadata(files, model_dir):
    """llama.cpp tokenizes like loraplex (the "smollm" pre-tokenizer splits digits one by one)
    and gets the values SmolLM2's original GGUF has."""
    llm = load_llama_cpp(files["base"], vocab_only=True)
    tokenizer = Tokenizer(model_dir)
    for text in ["Call 555-1234 at 10:30, ok?", "  indented\n\ttab", "héllo wörld 🙂",
                 "<|im_start|>user\nHi<|im_end|>\n"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)
    reader = gguf.GGUFReader(files["base"])
    expected = {"tokenizer.ggml.pre": "smollm", "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False,
                "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0}
    assert {key: reader.get_field(key).contents() for key in expected} == expected
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied to token_embd
    assert "SmolLM" in (files["base"].with_suffix(".Modelfile")).read_text()  # SYSTEM prompt


# dtype -> (bound on max |logit - f32 logit|, least top-1 agreement with f32), on logits up to
# ~35. Measured on this prompt: f16 0.08 and 100% (11-bit mantissas, ~5e-4 relative error per
# weight); q8_0 2.2 and 97% (1 of 35 positions). q8_0's difference comes mostly from llama.cpp
# quantizing the activations to 8 bits for quantized matmuls: SmolLM2's original Q4_1 GGUF, whose
# weights equal our f32 export's exactly, differs from it by 2.5 and 98% too. The bounds leave
# room for near-ties, no more.
LOGIT_BOUNDS = {"f16": (0.25, 0.95), "q8_0": (4.0, 0.9)}


def test_f16_and_q8_0_stay_close_to_f32(files, loraplex_runs):
    prompts, _, tuned, _ = loraplex_runs
    tokens = prompts[0] + tuned[0]

    def logits(name: str) -> np.ndarray:  # [len(tokens), vocab]
        llm = load_llama_cpp(files[name], n_ctx=512, logits_all=True)
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])

    reference = logits("merged")
    for dtype, (max_diff, min_agreement) in LOGIT_BOUNDS.items():
        got = logits(f"merged-{dtype}")
        diff = np.abs(got - reference).max()
        agreement = (got.argmax(axis=1) == reference.argmax(axis=1)).mean()
        print(f"{dtype}: max abs logit difference {diff:.3f}, top-1 agreement {agreement:.1%}")
        assert diff < max_diff and agreement >= min_agreement
