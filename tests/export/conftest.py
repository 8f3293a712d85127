"""Export fixtures: llama.cpp set up to check an export (tests/conftest.py's bpe_llama_dir is
the tiny model whose tokenizer llama.cpp can load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def load_llama_cpp(model_path: Path, lora_path: Path | None = None, **kwargs):
    """A llama_cpp.Llama set up to check an export, not llama.cpp's speed tricks:

    - an f32 KV cache: llama.cpp's default f16 cache moves SmolLM2's logits by up to 0.05, while
      greedy answers pass through near-ties as close as 0.009; with f32 the difference from
      loraplex is 1e-4;
    - one thread: ggml's threads spin-wait for each other at every step, so on a busy machine
      with few cores a descheduled second thread stalls the first (measured on a shared 2-core
      machine: four 32-token answers in 5 s with one thread, 412 s with two).
    """
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(model_path), lora_path=lora_path and str(lora_path), verbose=False,
        n_threads=1, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kwargs,
    )


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    """Torch's OpenMP threads spin-wait the same way: on that machine, under load, loraplex's
    four greedy answers took 82 s with two threads and 4.5 s with one. Speed only; restored
    after these tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
