"""A Hugging Face checkpoint directory -> our LlamaModel with its weights (safetensors only).

read_config and ModelLoadError live in model/families.py (which families we run) and are
imported from here too, the loader being where callers meet them.
"""

from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.lora.modules import FUSED_LINEARS
from loraplex.model.families import ModelLoadError, read_config, read_hf_config
from loraplex.model.known_shapes import KNOWN_MODEL_SHAPES
from loraplex.model.llama import LlamaModel
from loraplex.model.model_config import ModelConfig

# Checkpoint tensor name prefix -> our parameter name prefix (the one name map). Gemma 3's
# multimodal checkpoints keep the language model under language_model (transformers < 4.52) or
# model.language_model; the first matching prefix wins.
NAME_MAP = {
    "model.language_model.": "", "language_model.model.": "", "language_model.lm_head.": "lm_head.",
    "model.": "", "lm_head.": "lm_head.",
}
# The multimodal wrapper's vision tower and projector: we serve its language model only.
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.")
# Tensors some checkpoints carry that we derive ourselves.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
    # A Gemma 3 multimodal checkpoint: its vision tower is left unread (we serve text only).
    skipped = VISION_PREFIXES if read_hf_config(model_dir)["model_type"] == "gemma3" else ()
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
    # Most checkpoints name q/k/v and gate/up separately; we check and load them by those names.
    expected = checkpoint_state_dict(model)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith(IGNORED_SUFFIXES) or name.startswith(skipped):
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
    model.init_rope(device)  # built on "meta", so the buffers hold no data yet
    return model.eval()


def _fused_pieces(config: ModelConfig, separate: bool = False
                  ) -> dict[str, tuple[list[str], list[int]]]:
    """Our fused parameter name -> the checkpoint's parameter names it is the row-wise
    concatenation of, and their row counts; e.g. layers.0.self_attn.qkv_proj.weight ->
    ([...q_proj.weight, ...k_proj.weight, ...v_proj.weight], [576, 192, 192]). None for a
    checkpoint that stores them fused as we do (Phi-3: qkv_proj, gate_up_proj, same order),
    unless `separate`."""
    pieces = {}
    if config.checkpoint_fused and not separate:
        return pieces
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


def checkpoint_state_dict(model: LlamaModel, separate: bool = False) -> dict[str, torch.Tensor]:
    """The model's parameters under the checkpoint's names: fused linears split back into
    their modules (views, no copy). `separate`: split them even where the checkpoint fuses them
    (Phi-3), naming q/k/v and gate/up as Llama does."""
    state = dict(model.state_dict())
    for fused, (names, sizes) in _fused_pieces(model.config, separate).items():
        state.update(zip(names, state.pop(fused).split(sizes), strict=True))
    return state
