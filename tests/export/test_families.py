"""GGUF export of the families beyond Llama: Qwen3 (llama.cpp's qwen3 architecture) and Phi-3
(its fused checkpoint written as Llama's separate tensors), each run by llama.cpp like
transformers + PEFT, merged and as a LoRA GGUF; Gemma 3 refused by name."""

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


def _checkpoint(family, path):
    """A tiny random checkpoint of the family with a BPE tokenizer llama.cpp can load."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, Phi3Config, Qwen3Config

    path.mkdir(exist_ok=True)
    vocab_size = save_bpe_tokenizer(path) + 16
    config = {"qwen3": Qwen3Config, "phi3": Phi3Config, "gemma3": Gemma3TextConfig}[family](
        **SHAPE, vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # not all ones: a q/k norm left out would show
                param.normal_(1.0, 0.3)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize(("family", "targets"), [
    ("qwen3", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
])
def test_llama_cpp_runs_the_export_like_peft(family, targets, tmp_path):
    model = _checkpoint(family, tmp_path / "model")
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
        assert np.abs(got - reference).max() < 1e-4, family


def test_gemma3_export_is_refused_by_name(tmp_path):
    _checkpoint("gemma3", tmp_path)
    with pytest.raises(ExportError, match="Gemma 3 GGUF export is not supported"):
        export_merged(tmp_path, tmp_path / "m.gguf", "f32")
