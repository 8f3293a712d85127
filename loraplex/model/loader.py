"""A Hugging Face checkpoint directory -> our LlamaModel with its weights (safetensors only)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.lora.modules import FUSED_LINEARS
from loraplex.model.known_shapes import KNOWN_MODEL_SHAPES
from loraplex.model.llama import LlamaModel, ModelConfig, rope_inv_freq

# config.json "model_type" values we run, and the architecture class names that go with them.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",  # Llama 2, Llama 3.x, SmolLM2
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Checkpoint tensor name prefix -> our parameter name prefix (the one name map).
NAME_MAP = {"model.": "", "lm_head.": "lm_head."}
# Tensors some checkpoints carry that we derive ourselves.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ModelLoadError(ValueError):
    """A checkpoint we cannot run; the message names the directory and the reason."""


def read_config(model_dir: Path) -> ModelConfig:
    """Parse and validate config.json into a ModelConfig."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json; expected a Hugging Face checkpoint dir")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(hf.get("architectures") or []) or "unknown architecture"
        raise ModelLoadError(
            f"{model_dir}: model_type {model_type!r} ({archs}) is not supported; loraplex runs the "
            f"llama family: {', '.join(SUPPORTED_MODEL_TYPES.values())}"
        )
    num_heads = hf["num_attention_heads"]
    # transformers 5 keeps rope_theta inside rope_parameters; older configs use top-level keys.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{model_dir}: RoPE scaling {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
    if rope_type == "llama3" and "original_max_position_embeddings" not in rope_scaling:
        rope_scaling["original_max_position_embeddings"] = hf["max_position_embeddings"]
    sliding_window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        sliding_window = None
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        rope_scaling=rope_scaling,
        sliding_window=sliding_window,
    )


def plan_config(model: str) -> ModelConfig:
    """A model's shape for `loraplex plan`, without its weights: a KNOWN_MODEL_SHAPES name, a
    config.json file, or a checkpoint directory (or default model, pulled if need be)."""
    # pull brings in gguf and tokenizers, which loading a model never needs
    from loraplex.model.pull import DEFAULT_MODELS, resolve_model

    if model in KNOWN_MODEL_SHAPES:
        return ModelConfig(**KNOWN_MODEL_SHAPES[model])
    path = Path(model).expanduser()
    if path.is_file() and path.name == "config.json":
        return read_config(path.parent)
    if not path.is_dir() and model not in DEFAULT_MODELS:
        raise ModelLoadError(f"{model!r} is neither a known model, a config.json nor a checkpoint "
                             f"directory; known models: {', '.join(KNOWN_MODEL_SHAPES)}")
    return read_config(resolve_model(model))


def _our_name(name: str) -> str:
    for prefix, ours in NAME_MAP.items():
        if name.startswith(prefix):
            return ours + name[len(prefix) :]
    return name


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    """Build the model and load its weights from the directory's *.safetensors files."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        reason = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise ModelLoadError(
            f"{model_dir}: {reason}; loraplex loads *.safetensors only (pickle files can run "
            "arbitrary code). Convert the checkpoint to safetensors first."
        )
    with torch.device("meta"):
        model = LlamaModel(config)
    # The checkpoint names q/k/v and gate/up separately; we check and load them by those names.
    expected = checkpoint_state_dict(model)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith(IGNORED_SUFFIXES):
                        continue
                    ours = _our_name(name)
                    if ours == "lm_head.weight" and config.tie_word_embeddings:
                        continue
                    if ours not in expected:
                        raise ModelLoadError(f"{file}: unexpected tensor {name!r}")
                    tensor = f.get_tensor(name)
                    if tensor.shape != expected[ours].shape:
                        raise ModelLoadError(
                            f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {tuple(expected[ours].shape)}"
                        )
                    state[ours] = tensor.to(device=device, dtype=dtype)
        except (OSError, RuntimeError) as e:  # safetensors reports corrupt files this way
            raise ModelLoadError(f"{file}: cannot read safetensors file ({e})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{model_dir}: checkpoint lacks {len(missing)} tensors: {missing[:5]}")
    state = _fuse(state, config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)  # built on "meta", so it holds no data yet
    return model.eval()


def _fused_pieces(config: ModelConfig) -> dict[str, tuple[list[str], list[int]]]:
    """Our fused parameter name -> the checkpoint's parameter names it is the row-wise
    concatenation of, and their row counts; e.g. layers.0.self_attn.qkv_proj.weight ->
    ([...q_proj.weight, ...k_proj.weight, ...v_proj.weight], [576, 192, 192])."""
    pieces = {}
    for layer in range(config.num_layers):
        for path, modules in FUSED_LINEARS.items():
            if len(modules) == 1:
                continue
            parent = path.split(".")[0]
            has_bias = parent == "self_attn" and config.qkv_bias  # Qwen2: biases on q, k, v
            for kind in ("weight", "bias") if has_bias else ("weight",):
                names = [f"layers.{layer}.{parent}.{module}.{kind}" for module in modules]
                pieces[f"layers.{layer}.{path}.{kind}"] = (names, config.fused_out_features(path))
    return pieces


def _fuse(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    for fused, (names, _) in _fused_pieces(config).items():
        state[fused] = torch.cat([state.pop(name) for name in names])
    return state


def checkpoint_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The model's parameters under the checkpoint's names: fused linears split back into
    their modules (views, no copy)."""
    state = dict(model.state_dict())
    for fused, (names, sizes) in _fused_pieces(model.config).items():
        state.update(zip(names, state.pop(fused).split(sizes), strict=True))
    return state
