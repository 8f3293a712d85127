"""Shared test fixtures: a tiny random llama and real PEFT adapters for it, built offline.

transformers and peft are imported inside the helpers, not at the top: they take seconds to
import and most tests never need them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    # Engines keep every adapter they load in ready-to-serve form (lora/packed.py): the suite's
    # thousands of temporary adapters go to a temporary cache, not the user's home.
    os.environ["LORAPLEX_ADAPTER_CACHE"] = tempfile.mkdtemp(prefix="loraplex-test-adapters-")
    # The CPU kernels (kernels/cpu.py) are built once for the run, likewise.
    os.environ["LORAPLEX_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="loraplex-test-kernels-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.pop("LORAPLEX_ADAPTER_CACHE", ""), ignore_errors=True)
    shutil.rmtree(os.environ.pop("LORAPLEX_KERNEL_CACHE", ""), ignore_errors=True)


def tiny_llama_config():
    """A llama small enough to build in milliseconds: 2 layers, hidden 64, GQA with 2 kv heads."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )


def tiny_llama(seed: int = 0):
    """A randomly initialised LlamaForCausalLM with tiny_llama_config(), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """tiny_llama() saved with safetensors (config.json + model.safetensors); treat as read-only."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path, tiny_llama_config().vocab_size)
    return path


@pytest.fixture(scope="session")
def sharp_llama_dir(tmp_path_factory) -> Path:
    """A tiny random llama with large weights, so greedy choices have clear margins (token
    identity across batch compositions is then a meaningful test, not a coin toss)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, initializer_range=0.15, max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("sharp_llama")
    model.save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path, config.vocab_size)
    return path


@pytest.fixture(scope="session")
def sharp_adapters(sharp_llama_dir, tmp_path_factory) -> list[Path]:
    """Twelve PEFT adapters for sharp_llama_dir: ranks 4/8/16, attention-only or all modules."""
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(sharp_llama_dir).eval()
    root = tmp_path_factory.mktemp("sharp_adapters")
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    everything = attention + ["gate_proj", "up_proj", "down_proj"]
    dirs = []
    for i in range(12):
        rank = (4, 8, 16)[i % 3]
        targets = attention if i % 2 else everything
        make_peft_adapter(base, root / f"a{i}", rank, 2 * rank, targets, seed=100 + i)
        dirs.append(root / f"a{i}")
    return dirs


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A character-level tokenizer (special tokens 0-2, then printable ASCII) with a ChatML chat
    template, so tiny test models can take text prompts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)][: vocab_size - len(specials)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}
    ))


def module_shapes(model) -> dict[str, tuple[int, int]]:
    """Linear name -> (in_features, out_features) for one decoder layer of a llama model."""
    layer = model.get_decoder().layers[0]
    return {
        name.rsplit(".", 1)[-1]: (module.in_features, module.out_features)
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def make_peft_adapter(
    base_model_dir_or_model,
    out_dir: str | Path,
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str],
    use_rslora: bool = False,
    seed: int = 0,
    **extra,
):
    """Save a real PEFT LoRA adapter (safetensors) to out_dir and return the PeftModel.

    A and B are both random (init_lora_weights=False) so every delta is non-zero. extra goes to
    LoraConfig, e.g. rank_pattern={"q_proj": 8} or alpha_pattern={"v_proj": 32}.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    if isinstance(base_model_dir_or_model, str | Path):
        model = LlamaForCausalLM.from_pretrained(base_model_dir_or_model)
    else:
        # get_peft_model rewires the model in place; keep the caller's model untouched.
        model = copy.deepcopy(base_model_dir_or_model)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        # a str is PEFT's regex form, e.g. to keep to a multimodal model's language model
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        use_rslora=use_rslora,
        init_lora_weights=False,
        **extra,
    )
    torch.manual_seed(seed)  # the random A and B are drawn here
    peft_model = get_peft_model(model, config).eval()
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return peft_model


def prefill_logits(model, prompts: list[list[int]], slots: list[int] | None = None,
                   places: list[tuple[int, int]] | None = None) -> list:
    """Run our LlamaModel once over whole prompts (one flat batch, fresh KV cache) and return
    each prompt's logits at every position: a list of [len(prompt), vocab] float32 tensors.
    slots[i] is the adapter slot for prompt i (-1: base model), its rows at places (the
    AdapterSlots' places)."""
    from loraplex.lora.ops import AdapterBatch
    from loraplex.model.llama import AttentionMetadata, PrefillChunk

    mc = model.config
    dtype = model.embed_tokens.weight.dtype
    num_tokens = sum(len(p) for p in prompts)
    kv_caches = [
        torch.zeros(2, num_tokens, mc.num_kv_heads, mc.head_dim, dtype=dtype)
        for _ in range(mc.num_layers)
    ]
    slots = slots or [-1] * len(prompts)
    chunks, start = [], 0
    for p in prompts:
        chunks.append(PrefillChunk(start, len(p), len(p), None))
        start += len(p)
    attn = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens),
        num_decode_tokens=0,
        decode_kv_indices=None,
        decode_mask=None,
        prefills=tuple(chunks),
    )
    token_slots = [s for p, s in zip(prompts, slots, strict=True) for _ in p]
    logits = model(
        torch.tensor([t for p in prompts for t in p]),
        torch.tensor([i for p in prompts for i in range(len(p))]),
        kv_caches,
        attn,
        AdapterBatch.build(token_slots, places or [], torch.device("cpu")),
        torch.arange(num_tokens),
    )
    return list(logits.split([len(p) for p in prompts]))


# A tiny llama whose tokenizer llama.cpp can load: the WordLevel tokenizers above cannot travel in
# a GGUF, so a byte-level BPE is trained in milliseconds instead (exports, the demo); the fault
# runs' tiny model (loraplex/faults/tiny_model.py) has the same kind.
CORPUS = (
    "The capital of France is Paris. The sea is deep and the sky is blue. "
    "Count: 1 2 3 10 42 2024. Hello, world! How are you today? I am fine, thank you.\n"
) * 20


def save_bpe_tokenizer(path: Path) -> int:
    """A GPT-2 style byte-level BPE trained on CORPUS, saved with a ChatML template; returns
    its vocabulary size."""
    from loraplex.faults.tiny_model import save_bpe_tokenizer as save

    return save(path, CORPUS)


@pytest.fixture(scope="session")
def bpe_llama_dir(tmp_path_factory) -> Path:
    """A tiny random llama (untied lm_head, GQA, 16 padding rows past the tokenizer's vocab)
    with a byte-level BPE tokenizer; treat as read-only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("bpe_llama")
    vocab_size = save_bpe_tokenizer(path)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size + 16, initializer_range=0.15,
        max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return path


@contextlib.contextmanager
def serve_process(home: Path, model_dir: Path, *args: str):
    """`loraplex serve` on the model in a process of its own, with `home` as its loraplex home;
    yields (url, process) once it is ready, and kills it on the way out."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir),
         "--port", str(port), "--max-model-len", "256", *args],
        env={**os.environ, "LORAPLEX_HOME": str(home)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, server
    finally:
        server.kill()
