"""Our llama-family forward pass against transformers' on tiny random models of each kind."""

import pytest
import torch

from loraplex.model.loader import ModelLoadError, load_model
from tests.conftest import prefill_logits

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
)


def _variants():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama2": LlamaConfig(**TINY),
        "llama3-rope-scaling": LlamaConfig(
            **TINY,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        "smollm2-tied": LlamaConfig(**TINY, tie_word_embeddings=True),
        "mistral": MistralConfig(**TINY, sliding_window=None),
        "qwen2-bias": Qwen2Config(**TINY, tie_word_embeddings=True),
    }


@pytest.mark.parametrize("name", ["llama2", "llama3-rope-scaling", "smollm2-tied", "mistral",
                                  "qwen2-bias"])
def test_logits_match_transformers(name, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_variants()[name]).eval()
    if name == "qwen2-bias":  # random init leaves biases at zero: make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_model(tmp_path, torch.float32, torch.device("cpu"))
    prompts = [[1, 5, 9, 33, 2, 7, 100, 64, 3] * 10, [4, 8, 15, 16, 23, 42]]
    got = prefill_logits(ours, prompts)
    for prompt, logits in zip(prompts, got, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0]
        assert (logits - want).abs().max().item() <= 1e-4


def test_refuses_other_architectures(tmp_path):
    config = '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}'
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match="gpt2.*not supported.*llama family"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def test_refuses_pickle_only_checkpoints(tiny_llama_dir, tmp_path):
    import shutil

    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ModelLoadError, match="only pickle weights.*safetensors only"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def test_refuses_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def test_refuses_unsupported_rope_scaling(tiny_llama_dir, tmp_path):
    import json
    import shutil

    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="yarn"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_matmul_attention_matches_sdpa(dtype, tolerance):
    """The CPU half-precision decode path (two matmuls) against PyTorch's SDPA in float32."""
    from loraplex.model.llama import Attention
    from loraplex.model.model_config import ModelConfig

    config = ModelConfig(vocab_size=32, hidden_size=48, intermediate_size=64, num_layers=1,
                         num_heads=6, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                         rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=True)
    attention = Attention(config)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 6, 8, generator=gen)  # [nd, heads, dim]
    k, v = torch.randn(2, 5, 11, 2, 8, generator=gen)  # [nd, ctx, kv_heads, dim]
    lengths = torch.tensor([1, 4, 11, 7, 2])
    mask = (torch.arange(11)[None] < lengths[:, None])[:, None, None, :]
    want = attention._sdpa(q[:, None], k, v, mask)[:, 0]
    got = attention._decode_matmul(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    assert got.dtype == dtype and got.shape == want.shape
    assert (got.float() - want).abs().max() < tolerance
