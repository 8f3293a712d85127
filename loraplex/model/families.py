"""config.json -> ModelConfig: the model families we run, the features each switches on, and a
named refusal for everything else (never a model that runs with silently wrong output)."""

import json
from collections.abc import Sequence
from pathlib import Path

from loraplex.lora.modules import FUSED_ADAPTER_MODULES
from loraplex.model.model_config import ModelConfig

# config.json "model_type" values we run, and the architecture class names that go with them.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",  # Llama 2, Llama 3.x (3.2's 1B/3B tie embeddings), SmolLM2
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",  # dense Qwen3
    "phi3": "Phi3ForCausalLM",  # Phi-3 and Phi-4
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",  # its language model only (text in, text out)
}
# Neighbours of those families that we refuse by name, saying what we do not implement.
REFUSED_MODEL_TYPES = {
    "gemma": "Gemma 1 (its norms and layer layout differ from Gemma 3's)",
    "gemma2": "Gemma 2's attention and final-logit soft-capping",
    "qwen3_moe": "Qwen3 MoE's mixture-of-experts layers (dense Qwen3 is supported)",
    "qwen2_moe": "Qwen2 MoE's mixture-of-experts layers",
    "mixtral": "Mixtral's mixture-of-experts layers",
    "phimoe": "Phi-3.5-MoE's mixture-of-experts layers",
    "phi3small": "Phi-3-small's block-sparse attention",
    "phi4_multimodal": "Phi-4-multimodal's vision and audio towers",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
GEMMA3 = ("gemma3_text", "gemma3")


class ModelLoadError(ValueError):
    """A checkpoint we cannot run; the message names the directory and the reason."""


def read_hf_config(model_dir: Path) -> dict:
    """config.json as a dict; a multimodal Gemma 3 wrapper's text_config is returned with its
    model_type set to "gemma3" still (so the loader knows its tensor names)."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json; expected a Hugging Face checkpoint dir")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    model_type = hf.get("model_type")
    if model_type in REFUSED_MODEL_TYPES:
        raise ModelLoadError(f"{model_dir}: model_type {model_type!r} is not supported: "
                             f"loraplex does not implement {REFUSED_MODEL_TYPES[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(hf.get("architectures") or []) or "unknown architecture"
        raise ModelLoadError(
            f"{model_dir}: model_type {model_type!r} ({archs}) is not supported; loraplex runs the "
            f"llama family: {', '.join(SUPPORTED_MODEL_TYPES.values())}"
        )
    if model_type == "gemma3":
        return {**hf["text_config"], "model_type": "gemma3"}
    return hf


def read_config(model_dir: Path) -> ModelConfig:
    """Parse and validate config.json into a ModelConfig."""
    hf = read_hf_config(model_dir)
    model_type = hf["model_type"]
    _refuse_features(hf, model_dir)
    num_heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    if model_type in GEMMA3 and "full_attention" in rope:  # transformers 5: one per layer type
        rope = rope["full_attention"]
    rope_theta, rope_scaling = _rope(hf, rope, model_dir)
    sliding_window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        sliding_window = None
    features = {"sliding_window": sliding_window}
    if model_type in GEMMA3:
        features.update(_gemma3_features(hf))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", model_type in GEMMA3),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        rope_scaling=rope_scaling,
        qk_norm=model_type in ("qwen3", *GEMMA3),
        checkpoint_fused=model_type == "phi3",
        **features,
    )


def _rope(hf: dict, rope: dict, model_dir: Path) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's rope_parameters or older top-level keys."""
    rope = dict(rope or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{model_dir}: RoPE scaling {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ModelLoadError(f"{model_dir}: partial RoPE (partial_rotary_factor={partial}) is not "
                             "supported")
    rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
    if rope_type == "llama3" and "original_max_position_embeddings" not in rope_scaling:
        rope_scaling["original_max_position_embeddings"] = hf["max_position_embeddings"]
    return rope.get("rope_theta", hf.get("rope_theta", 10000.0)), rope_scaling


def _gemma3_features(hf: dict) -> dict:
    """Gemma 3's ModelConfig switches: GeGLU, scaled embeddings, (1 + weight) sandwich norms,
    its attention scale, and interleaved sliding-window and global layers with two RoPE bases."""
    num_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:  # configs before transformers 4.53: every Nth layer is global
        pattern = hf.get("sliding_window_pattern", 6)
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                       for i in range(num_layers)]
    local = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
    return {
        "hidden_act": "gelu_tanh",
        "scale_embeddings": True,
        "norm_unit_offset": True,
        "sandwich_norms": True,
        "query_pre_attn_scalar": hf.get("query_pre_attn_scalar", 256),
        "layer_types": tuple(layer_types),
        "rope_local_theta": local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)),
        # Without sliding layers the window bounds nothing; with them, the engine caps the
        # context to it (so those layers see every key, as full attention does).
        "sliding_window": hf.get("sliding_window") if "sliding_attention" in layer_types else None,
    }


def _refuse_features(hf: dict, model_dir: Path) -> None:
    """Options of a supported model_type whose math we do not implement."""
    gemma = hf["model_type"] in GEMMA3
    refusals = {
        "attn_logit_softcapping": "attention logit soft-capping",
        "final_logit_softcapping": "final logit soft-capping",
        "use_bidirectional_attention": "bidirectional attention (an embedding model)",
        "mlp_bias": "biases on the MLP projections",
    }
    for key, what in refusals.items():
        if hf.get(key):
            raise ModelLoadError(f"{model_dir}: {key}={hf[key]!r}: {what} is not supported")
    act = hf.get("hidden_activation" if gemma else "hidden_act") or hf.get("hidden_act")
    wanted = "gelu_pytorch_tanh" if gemma else "silu"
    if act not in (None, wanted):
        raise ModelLoadError(f"{model_dir}: activation {act!r} is not supported "
                             f"({hf['model_type']} runs {wanted})")
    unknown = set(hf.get("layer_types") or ()) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ModelLoadError(f"{model_dir}: layer types {sorted(unknown)} are not supported")


def peft_target_modules(model_dir: Path, targets: Sequence[str]) -> list[str] | str:
    """PEFT's LoraConfig(target_modules=) that trains LoRA on `targets` (our module names) of
    this checkpoint: Phi-3's fused modules in place of the modules they hold, and for a
    multimodal Gemma 3 a regex that keeps the adapter to its language model (its vision tower
    has q_proj and friends too, which we do not serve)."""
    model_type = read_hf_config(model_dir)["model_type"]
    names = list(targets)
    if model_type == "phi3":
        for fused, modules in FUSED_ADAPTER_MODULES.items():
            chosen = [m for m in modules if m in names]
            if chosen and len(chosen) < len(modules):
                raise ModelLoadError(
                    f"{model_dir}: Phi-3 checkpoints fuse {', '.join(modules)} into {fused}; "
                    f"a LoRA on it adapts all of them, so target all or none (got "
                    f"{', '.join(chosen)})")
            if chosen:
                names = [fused, *(m for m in names if m not in modules)]
    if model_type == "gemma3":
        return rf".*language_model.*\.({'|'.join(names)})"
    return names
