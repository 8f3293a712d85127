"""GGUF export of the families beyond Llama: Qwen3 (llama.cpp's qwen3 architecture), Phi-3 (its
fused checkpoint written as Llama's separate tensors), Gemma 3 (gemma3: interleaved sliding and
global layers, two RoPE bases, linear scaling on the global ones) and Llama with linear or
llama3 (Llama 3.1/3.2) RoPE scaling, each run by llama.cpp like transformers + PEFT, merged and
as a LoRA GGUF."""

import numpy as np
import pytest
import torch

from loraplex.export.errors import ExportError
from loraplex.export.gguf import export_adapter, export_merged
from loraplex.model.tokenizer import Tokenizer
from tests.conftest import make_peft_adapter, save_bpe_tokenizer
from tests.export.test_gguf import TEXTS, llama_cpp_logits

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
             initializer_range=0.15)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GEMMA3 = dict(num_hidden_layers=4, sliding_window=128, query_pre_attn_scalar=16,
              layer_types=["sliding_attention", "full_attention"] * 2,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                  "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
LINEAR_ROPE = dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4})
# Llama 3.2's: tied embeddings, llama3 RoPE scaling (here from 32 positions on, so it matters).
LLAMA3_2 = dict(tie_word_embeddings=True, rope_parameters={
    "rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
# Largest logit difference from transformers + PEFT (f32 weights and KV cache in llama.cpp).
# Gemma's: ggml computes GELU from an f16 table; transformers with GELU's input and output
# rounded to f16 the same way comes within 1.5e-4 (measured: 1.7e-3 without).
TOLERANCE = {"gemma3": 5e-3}


def _checkpoint(family, path, **overrides):
    """A tiny random checkpoint of the family with a BPE tokenizer llama.cpp can load."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        Phi3Config,
        Qwen3Config,
    )

    path.mkdir(exist_ok=True)
    vocab_size = save_bpe_tokenizer(path) + 16
    config_class = {"qwen3": Qwen3Config, "phi3": Phi3Config, "gemma3": Gemma3TextConfig,
                    "llama": LlamaConfig}[family]
    config = config_class(**{**SHAPE, **overrides}, vocab_size=vocab_size, bos_token_id=None,
                          eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # not their initial ones (Gemma: zeros): a norm left out shows
                param.normal_(0.0 if family == "gemma3" else 1.0, 0.3)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize(("family", "targets", "overrides"), [
    ("qwen3", ALL, {}),
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], {}),
    ("gemma3", ALL, GEMMA3),
    ("llama", ALL, LINEAR_ROPE),
    ("llama", ALL, LLAMA3_2),
])
def test_llama_cpp_runs_the_export_like_peft(family, targets, overrides, tmp_path):
    model = _checkpoint(family, tmp_path / "model", **overrides)
    peft = make_peft_adapter(model, tmp_path / "adapter", 8, 16, targets, use_rslora=True, seed=3)
    tokens = Tokenizer(tmp_path / "model").encode(TEXTS[0] + TEXTS[1])
    with torch.no_grad():
        want = peft(torch.tensor([tokens])).logits[0].numpy()
        with peft.disable_adapter():
            want_base = peft(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(want - want_base).max() > 0.1  # the adapter matters

    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    export_merged(model_dir, tmp_path / "base.gguf", "f32")
    export_merged(model_dir, tmp_path / "merged.gguf", "f32", adapter_dir)
    export_adapter(model_dir, adapter_dir, tmp_path / "lora.gguf", "f32", base_gguf="./base.gguf")
    got_base = llama_cpp_logits(tmp_path / "base.gguf", tokens)
    got_merged = llama_cpp_logits(tmp_path / "merged.gguf", tokens)
    got_lora = llama_cpp_logits(tmp_path / "base.gguf", tokens, lora_path=tmp_path / "lora.gguf")
    for got, reference in ((got_base, want_base), (got_merged, want), (got_lora, want)):
        assert np.abs(got - reference).max() < TOLERANCE.get(family, 1e-4), family


def test_gemma3_attention_scale_llama_cpp_would_not_use_is_refused(tmp_path):
    _checkpoint("gemma3", tmp_path, **{**GEMMA3, "query_pre_attn_scalar": 24})
    with pytest.raises(ExportError, match="query_pre_attn_scalar=24: llama.cpp's gemma3 scales "
                                          "attention by 16"):
        export_merged(tmp_path, tmp_path / "m.gguf", "f32")
