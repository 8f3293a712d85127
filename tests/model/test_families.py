"""Each model family beyond Llama/Mistral/Qwen2 against transformers + PEFT on tiny random
checkpoints: a batch mixing several adapters (and none) gives, per row, the logits and the greedy
tokens and log-probs that row's adapter gives alone in PEFT; bf16 within test_llm's tolerance
table. Then the refusals: families and features we do not run are named at load."""

import copy
import json

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.lora.adapter import AdapterError, load_adapter
from loraplex.lora.slots import AdapterSlots
from loraplex.model.loader import ModelLoadError, load_model, read_config
from tests.conftest import make_peft_adapter, prefill_logits, save_tiny_tokenizer
from tests.test_llm import BF16_MAX_VS_PEFT, BF16_VS_PEFT, PROMPTS, _peft_greedy

# initializer_range 0.15: large weights, so greedy choices have clear margins (see conftest).
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
             initializer_range=0.15)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Phi-3 checkpoints fuse q/k/v and gate/up, so PEFT adapters target the fused modules.
PHI3_ATTN = ["qkv_proj", "o_proj"]
PHI3_MLP = ["gate_up_proj", "down_proj"]
# A multimodal Gemma 3 adapter on the language model only (the vision tower has q_proj too).
GEMMA3_TEXT_ONLY = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Row i uses ROW_ADAPTERS[i] (an index into the family's adapters, or None for the base model).
ROW_ADAPTERS = [0, 1, None, 2, 1, 0, 2]


def _gemma3_text(**extra):
    from transformers import Gemma3TextConfig

    # Two sliding-window layers and one global one: both RoPE bases, the global one scaled;
    # query_pre_attn_scalar unlike head_dim, so the attention scale is tested too.
    return Gemma3TextConfig(
        **SHAPE, sliding_window=128, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        **extra)


def _config(family):
    from transformers import Gemma3Config, LlamaConfig, Phi3Config, Qwen3Config

    if family == "qwen3":
        return Qwen3Config(**SHAPE)
    if family == "phi3":
        return Phi3Config(**SHAPE, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "llama3.2-tied":
        return LlamaConfig(**SHAPE, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
    if family == "gemma3":
        return _gemma3_text()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    return Gemma3Config(text_config=_gemma3_text().to_dict(), vision_config=vision,
                        mm_tokens_per_image=4)


def _adapters(family):
    """(rank, alpha, targets, rslora) of the family's three adapters."""
    attn, every = (PHI3_ATTN, PHI3_ATTN + PHI3_MLP) if family == "phi3" else (ATTN, ATTN + MLP)
    if family == "gemma3-multimodal":
        return [(4, 8, GEMMA3_TEXT_ONLY, False), (8, 16, GEMMA3_TEXT_ONLY, True),
                (16, 8, GEMMA3_TEXT_ONLY, False)]
    return [(4, 8, attn, False), (8, 16, every, True), (16, 8, every[2:], False)]


FAMILIES = ["qwen3", "phi3", "llama3.2-tied", "gemma3", "gemma3-multimodal"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, checkpoint dir, adapter dirs): a tiny random model with norms made random too
    (they start at ones, or zeros for Gemma's 1 + weight, which would hide a wrong norm)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_config(request.param)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.normal_(0.0 if "gemma" in request.param else 1.0, 0.3)
    root = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(root / "model")
    save_tiny_tokenizer(root / "model", SHAPE["vocab_size"])
    dirs = []
    for i, (r, alpha, targets, rslora) in enumerate(_adapters(request.param)):
        make_peft_adapter(hf, root / f"a{i}", r, alpha, targets, use_rslora=rslora, seed=i + 1)
        dirs.append(root / f"a{i}")
    return request.param, root / "model", dirs


def _peft_models(model_dir, adapter_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    models = {None: base}
    for i, d in enumerate(adapter_dirs):
        models[i] = PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
    return models


def _ours(model_dir, adapter_dirs, dtype):
    model = load_model(model_dir, dtype, torch.device("cpu"))
    slots = AdapterSlots(model, max_loras=len(adapter_dirs), max_rank=16)
    shapes, num_layers = model.config.module_shapes(), model.config.num_layers
    for i, d in enumerate(adapter_dirs):
        slots.activate(i, load_adapter(d, num_layers=num_layers, module_shapes=shapes,
                                       max_rank=16, dtype=dtype))
    return prefill_logits(model, PROMPTS, [-1 if a is None else a for a in ROW_ADAPTERS],
                          slots.places)


def test_mixed_batch_logits_match_peft(family):
    name, model_dir, adapter_dirs = family
    got = _ours(model_dir, adapter_dirs, torch.float32)
    peft = _peft_models(model_dir, adapter_dirs)
    for prompt, adapter, logits in zip(PROMPTS, ROW_ADAPTERS, got, strict=True):
        with torch.no_grad():
            want = peft[adapter](torch.tensor([prompt])).logits[0]
            base = peft[None](torch.tensor([prompt])).logits[0]
        assert (logits - want).abs().max().item() <= 1e-4, (name, adapter)
        if adapter is not None:  # the adapter really changes the output
            assert (want - base).abs().max() > 1e-2, (name, adapter)


def test_mixed_batch_greedy_generation_matches_peft(family):
    name, model_dir, adapter_dirs = family
    llm = LLM(str(model_dir), max_loras=len(adapter_dirs), max_lora_rank=16,
              kv_cache_bytes=1 << 22)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params,
                        adapters=[None if a is None else adapter_dirs[a] for a in ROW_ADAPTERS])
    peft = _peft_models(model_dir, adapter_dirs)
    for prompt, adapter, out in zip(PROMPTS, ROW_ADAPTERS, outs, strict=True):
        want_tokens, want_logprobs = _peft_greedy(peft[adapter], prompt, 16)
        assert out.token_ids == want_tokens, (name, adapter)
        assert max(abs(a - b) for a, b in zip(out.logprobs, want_logprobs, strict=True)) < 1e-4


def test_mixed_batch_bf16_logits_within_tolerance(family):
    """test_llm's "any model" lines: as accurate as PEFT's own bf16 run. (Its tiny-model line,
    a fraction of the largest logit, is calibrated on a milder model: with these sharp weights
    PEFT's own bf16 error reaches 6% of the largest logit.)"""
    name, model_dir, adapter_dirs = family
    got = _ours(model_dir, adapter_dirs, torch.bfloat16)
    peft = _peft_models(model_dir, adapter_dirs)
    ours_sum = peft_sum = 0.0
    for prompt, adapter, logits in zip(PROMPTS, ROW_ADAPTERS, got, strict=True):
        with torch.no_grad():
            ref = peft[adapter](torch.tensor([prompt])).logits[0]
            peft_bf16 = copy.deepcopy(peft[adapter]).to(torch.bfloat16)(
                torch.tensor([prompt])).logits[0].float()
        ours_err, peft_err = (logits - ref).abs(), (peft_bf16 - ref).abs()
        assert ours_err.max() <= BF16_MAX_VS_PEFT * peft_err.max() + 1e-3, (name, adapter)
        ours_sum, peft_sum = ours_sum + ours_err.mean(), peft_sum + peft_err.mean()
    assert ours_sum <= BF16_VS_PEFT * peft_sum, name


def test_families_read_their_features(family):
    name, model_dir, _ = family
    config = read_config(model_dir)
    assert config.qk_norm == (name != "phi3" and not name.startswith("llama"))
    assert config.checkpoint_fused == (name == "phi3")
    assert config.tie_word_embeddings == (name != "qwen3" and name != "phi3")
    if name.startswith("gemma3"):
        assert config.sliding_window == 128 and config.rope_local_theta == 1e4
        assert config.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
        assert config.query_pre_attn_scalar == 24 and config.hidden_act == "gelu_tanh"
        assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
        # The engine caps the context to the sliding window: there, every layer is exact.
        assert LLM(str(model_dir), kv_cache_bytes=1 << 20).engine.max_model_len == 128


# -- adapters that do not fit -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_fused_adapter_with_wrong_rows_is_refused(family, tmp_path):
    _, model_dir, adapter_dirs = family
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter_dirs[0] / "adapter_config.json").read_text())
    tensors = load_file(adapter_dirs[0] / "adapter_model.safetensors")
    key = next(k for k in tensors if "qkv_proj.lora_B" in k)
    tensors[key] = tensors[key][:64]  # q's rows only
    save_file(tensors, bad / "adapter_model.safetensors")
    config = read_config(model_dir)
    with pytest.raises(AdapterError, match=r"qkv_proj has \d+ outputs|has shape \(64, 4\)"):
        load_adapter(bad, num_layers=3, module_shapes=config.module_shapes(), max_rank=16)


@pytest.mark.parametrize("family", ["gemma3-multimodal"], indirect=True)
def test_multimodal_adapter_on_the_vision_tower_is_refused(family, tmp_path):
    _, model_dir, _ = family
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    make_peft_adapter(hf, tmp_path / "a", 4, 8, ["q_proj"])  # language model and vision tower
    config = read_config(model_dir)
    with pytest.raises(AdapterError, match="vision_tower.*not supported"):
        load_adapter(tmp_path / "a", num_layers=3, module_shapes=config.module_shapes(),
                     max_rank=16)


# -- families and features we do not run --------------------------------------------------------
def _write_config(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(("model_type", "named"), [
    ("gemma2", "Gemma 2's attention and final-logit soft-capping"),
    ("qwen3_moe", "Qwen3 MoE's mixture-of-experts layers"),
    ("mixtral", "Mixtral's mixture-of-experts layers"),
    ("gemma", "Gemma 1"),
])
def test_refuses_neighbouring_families_by_name(tmp_path, model_type, named):
    with pytest.raises(ModelLoadError, match=f"{model_type}.*not supported.*{named}"):
        read_config(_write_config(tmp_path, {"model_type": model_type}))


def _hf_dict(config) -> dict:
    return json.loads(config.to_json_string())


@pytest.mark.parametrize(("change", "named"), [
    ({"final_logit_softcapping": 30.0}, "final logit soft-capping"),
    ({"attn_logit_softcapping": 50.0}, "attention logit soft-capping"),
    ({"use_bidirectional_attention": True}, "bidirectional attention"),
    ({"hidden_activation": "gelu"}, "activation 'gelu'"),
    ({"layer_types": ["chunked_attention"] * 3}, "layer types \\['chunked_attention'\\]"),
])
def test_refuses_gemma3_features_we_do_not_run(tmp_path, change, named):
    config = {**_hf_dict(_gemma3_text()), **change}
    with pytest.raises(ModelLoadError, match=named):
        read_config(_write_config(tmp_path, config))


def test_refuses_phi3_long_rope_and_partial_rotary(tmp_path):
    config = _hf_dict(_config("phi3"))
    long_rope = {**config, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}
    with pytest.raises(ModelLoadError, match="RoPE scaling 'longrope' is not supported"):
        read_config(_write_config(tmp_path, long_rope))
    partial = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                             "partial_rotary_factor": 0.75}}
    with pytest.raises(ModelLoadError, match="partial_rotary_factor=0.75"):
        read_config(_write_config(tmp_path, partial))


def test_refuses_a_silu_family_with_another_activation(tmp_path):
    config = {**_hf_dict(_config("qwen3")), "hidden_act": "gelu"}
    with pytest.raises(ModelLoadError, match="activation 'gelu'.*qwen3 runs silu"):
        read_config(_write_config(tmp_path, config))
