"""GGUF files for llama.cpp (and Ollama): a base model with an adapter merged in (or none), or
an adapter alone.

Merged:       W' = W + B_scaled @ A for every linear the adapter targets, in float32, on the
              weights freshly read from the checkpoint (the stored base is only read).
Adapter-only: llama.cpp's LoRA GGUF (general.type "adapter"), which llama.cpp applies at run
              time as W x + (alpha / rank) * B (A x) on top of a base GGUF of the same model.

Both follow llama.cpp's conventions: its tensor names (the gguf package's HF -> GGUF table), q/k
rows permuted from HF's rotate-half order to interleaved RoPE pairs (for its llama
architecture; qwen3 rotates halves as HF does), and GGUF shapes listed
innermost dimension first (the writer reverses numpy's order: numpy [out, in] is GGUF [in, out]).
A file is written to a temporary sibling and renamed into place, so `out` is either complete
or untouched.
"""

import errno
import os
import tempfile
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from loraplex.export.errors import ExportError
from loraplex.export.modelfile import modelfile_path, modelfile_text
from loraplex.export.tokenizer import add_tokenizer
from loraplex.lora.adapter import LoRAWeights, load_adapter
from loraplex.lora.modules import ATTENTION_MODULES, K_PROJ, Q_PROJ
from loraplex.model.loader import checkpoint_state_dict, load_model, read_config
from loraplex.model.model_config import ModelConfig
from loraplex.model.rope import rope_inv_freq
from loraplex.model.tokenizer import Tokenizer

QType = gguf.GGMLQuantizationType
# --dtype -> (encoding of the 2-D weights, the file type llama.cpp reports for the whole file).
DTYPES = {
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# llama.cpp architectures we write: llama (Llama, Mistral, SmolLM2, and Phi-3/Phi-4, whose math is
# Llama's once q/k/v and gate/up are stored apart), qwen3 and gemma3. llama.cpp's llama rotates
# adjacent pairs, so q/k rows are permuted from HF's order; the others rotate halves as HF does.
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "gemma3": gguf.MODEL_ARCH.GEMMA3}
PERMUTED_ARCHS = ("llama",)


@dataclass(frozen=True)
class ExportResult:
    gguf_path: Path
    modelfile_path: Path
    num_bytes: int  # of the GGUF file


def export_merged(
    model_dir: str | Path,
    out_path: str | Path,
    dtype: str,
    adapter_dir: str | Path | None = None,
    *,
    name: str | None = None,
    force: bool = False,
) -> ExportResult:
    """The base model of model_dir, with the adapter at adapter_dir merged in if given, as one
    GGUF (llama.cpp's llama or qwen3 architecture, see ARCHS); `name` is its general.name
    (default: the model dir's name)."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    qtype, file_type = _format(dtype)
    _refuse_overwrite(out_path, force)
    config = _read_supported_config(model_dir)
    arch = architecture(config)
    lora = _load_lora(adapter_dir, config) if adapter_dir is not None else None
    tokenizer = Tokenizer(model_dir)

    writer = gguf.GGUFWriter(None, arch)  # the (temporary) path is given when writing
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.name)
    _add_hyperparameters(writer, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, model_dir, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(ARCHS[arch], config.num_layers)
    for our_name, weight in _merged_weights(model_dir, config, lora).items():
        array = _llama_cpp_rows(our_name, weight.numpy(), config, arch)
        _add_tensor(writer, _gguf_name(names, our_name, arch), array, qtype)
    if config.rope_scaling and config.rope_scaling["rope_type"] == "llama3":
        # llama.cpp divides each RoPE frequency by its factor in rope_freqs [head_dim / 2].
        factors = rope_inv_freq(replace(config, rope_scaling=None)) / rope_inv_freq(config)
        _add_tensor(writer, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                    factors.numpy(), qtype)
    text = modelfile_text(f"./{out_path.name}", tokenizer)
    return _write(writer, out_path, text)


def export_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    out_path: str | Path,
    dtype: str,
    *,
    base_gguf: str,
    name: str | None = None,
    force: bool = False,
) -> ExportResult:
    """The adapter alone as a llama.cpp LoRA GGUF, for a base GGUF exported from model_dir.

    base_gguf is what the Modelfile's FROM names: a path relative to the Modelfile's folder
    (./smollm2-135m.gguf) or a model Ollama already has.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    qtype, file_type = _format(dtype)
    _refuse_overwrite(out_path, force)
    config = _read_supported_config(model_dir)
    arch = architecture(config)
    lora = _load_lora(adapter_dir, config)

    writer = gguf.GGUFWriter(None, arch)  # llama.cpp refuses an adapter of another arch
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_name(name or Path(adapter_dir).name)
    # llama.cpp scales B (A x) by alpha / rank, taking the rank of each pair from its B. Our B
    # already carries the adapter's scaling (alpha/r, rslora, alpha_pattern), so the factor must
    # be 1: alpha = rank, with every pair padded to the largest rank (zero rows of A and zero
    # columns of B add nothing) so that one alpha fits all of them.
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.rank))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    names = gguf.get_tensor_name_map(ARCHS[arch], config.num_layers)
    for (layer, module), (a, b) in sorted(lora.pairs()):
        pad = lora.rank - a.shape[0]
        a = F.pad(a, (0, 0, 0, pad))  # [rank, in]
        b = F.pad(b, (0, pad))  # [out, rank]
        our_name = _linear_weight(layer, module)
        # (A, B) is a low-rank factor of a weight delta, so B's rows are the delta's rows and
        # take the same q/k permutation as the base weight; A's columns are inputs and do not.
        b = _llama_cpp_rows(our_name, b.numpy(), config, arch)
        # llama.cpp's shapes: lora_a GGUF [in, rank], lora_b GGUF [rank, out], i.e. numpy
        # [rank, in] and [out, rank], the PEFT layout as is.
        base_name = _gguf_name(names, our_name, arch)  # e.g. blk.3.attn_q.weight
        _add_tensor(writer, f"{base_name}.lora_a", a.numpy(), qtype)
        _add_tensor(writer, f"{base_name}.lora_b", b, qtype)
    text = modelfile_text(base_gguf, Tokenizer(model_dir), adapter=f"./{out_path.name}")
    return _write(writer, out_path, text)


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k row order -> llama.cpp's; the inverse of loraplex.model.pull.unpermute_qk.

    HF rotates the two halves of each head (rotate_half); llama.cpp rotates adjacent pairs. So
    within each head, row j of the first half and row j of the second half become rows 2j and
    2j+1: view a head's rows as (2, head_dim/2), swap the axes. `n_head` is the kv-head count
    for k_proj.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _format(dtype: str) -> tuple[QType, gguf.LlamaFileType]:
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _refuse_overwrite(out_path: Path, force: bool) -> None:
    for path in (out_path, modelfile_path(out_path)):
        if path.exists() and not force:
            raise ExportError(f"{path} already exists; pass --force to overwrite it")


def architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture a (supported) model is written as."""
    if config.sandwich_norms:
        return "gemma3"
    return "qwen3" if config.qk_norm else "llama"


def _read_supported_config(model_dir: Path) -> ModelConfig:
    config = read_config(model_dir)
    if config.qkv_bias:
        raise ExportError(
            f"{model_dir}: q/k/v biases (Qwen2) need llama.cpp's qwen2 architecture; "
            "GGUF export writes the llama, qwen3 and gemma3 architectures only"
        )
    if config.sandwich_norms and config.query_pre_attn_scalar != _llama_cpp_gemma3_scalar(config):
        raise ExportError(
            f"{model_dir}: query_pre_attn_scalar={config.query_pre_attn_scalar}: llama.cpp's "
            f"gemma3 scales attention by {_llama_cpp_gemma3_scalar(config)} ** -0.5 for this "
            "shape, whatever the GGUF says, so the export would run differently there"
        )
    return config


def _llama_cpp_gemma3_scalar(config: ModelConfig) -> int:
    """The query_pre_attn_scalar llama.cpp's gemma3 uses (it ignores attention.scale): head_dim,
    or hidden / heads for what it takes for Gemma 3 27B (62 layers; 168 there, as published)."""
    if config.num_layers == 62:
        return config.hidden_size // config.num_heads
    return config.head_dim


def _add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """The <arch>.* keys llama.cpp builds the model from."""
    # Mistral-style sliding-window attention has no llama equivalent; within one window it
    # equals full attention, so the context is capped there (the engine caps max_model_len too).
    writer.add_context_length(min(config.max_position_embeddings,
                                  config.sliding_window or config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    # Explicit, as head_dim need not be hidden_size / num_heads.
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.sandwich_norms and config.sliding_window:  # Gemma 3 (with sliding layers)
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
        writer.add_rope_freq_base_swa(config.rope_local_theta)  # never scaled, as ours
    if config.rope_scaling and config.rope_scaling["rope_type"] == "linear":  # gemma3: global
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])


def _load_lora(adapter_dir: str | Path, config: ModelConfig) -> LoRAWeights:
    shapes = config.module_shapes()
    # No slot buffers to fit here, so any rank a matrix of the model can have is accepted.
    max_rank = max(max(shape) for shape in shapes.values())
    return load_adapter(adapter_dir, num_layers=config.num_layers, module_shapes=shapes,
                        max_rank=max_rank)


def _linear_weight(layer: int, module: str) -> str:
    """Our parameter name of a LoRA-targetable weight, e.g. layers.3.self_attn.q_proj.weight."""
    parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"layers.{layer}.{parent}.{module}.weight"


def _gguf_name(names: gguf.TensorNameMap, our_name: str, arch: str) -> str:
    # The loader's name map drops HF's "model." prefix; gguf's table maps HF names.
    hf_name = our_name if our_name.startswith("lm_head.") else f"model.{our_name}"
    gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
    if gguf_name is None:
        raise ExportError(f"tensor {hf_name!r} has no name in llama.cpp's {arch} architecture")
    return gguf_name


def _merged_weights(
    model_dir: Path, config: ModelConfig, lora: LoRAWeights | None
) -> dict[str, torch.Tensor]:
    """Every tensor llama.cpp needs, by our parameter name, float32, with the adapter merged."""
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    weights = checkpoint_state_dict(model, separate=True)  # Phi-3's fused ones apart too
    if config.tie_word_embeddings:
        # With no output.weight in the file, llama.cpp projects with token_embd, as HF ties.
        del weights["lm_head.weight"]
    for (layer, module), (a, b) in (lora.pairs() if lora else ()):
        name = _linear_weight(layer, module)
        # W + B_scaled @ A as a new tensor: [out, in] + [out, r] @ [r, in].
        weights[name] = torch.addmm(weights[name], b, a)
    return weights


def _llama_cpp_rows(our_name: str, array: np.ndarray, config: ModelConfig, arch: str
                    ) -> np.ndarray:
    if config.norm_unit_offset and our_name.endswith("norm.weight"):
        return array + 1  # llama.cpp's gemma norms scale by the weight, ours by 1 + weight
    if arch not in PERMUTED_ARCHS:
        return array
    if our_name.endswith(f"{Q_PROJ}.weight"):
        return permute_qk(array, config.num_heads)
    if our_name.endswith(f"{K_PROJ}.weight"):
        return permute_qk(array, config.num_kv_heads)
    return array


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, qtype: QType) -> None:
    """Add the tensor encoded as qtype, or as the encoding it falls back to."""
    if array.ndim == 1:
        # Norm weights scale every activation and are tiny: f32, as llama.cpp's converter does.
        qtype = QType.F32
    elif qtype == QType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        # q8_0 packs each row in blocks of 32 values; rows of another length (the B of a
        # rank-16 LoRA) take f16, as in llama.cpp's converter.
        qtype = QType.F16
    data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)


def _write(writer: gguf.GGUFWriter, out_path: Path, modelfile: str) -> ExportResult:
    """Write the GGUF and its Modelfile to temporary siblings, then rename both into place."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    num_bytes = sum(info.nbytes for shard in writer.tensors for info in shard.values())
    temps: list[Path] = []
    try:
        temps.append(_temp_sibling(out_path))
        temps.append(_temp_sibling(modelfile_path(out_path)))
        writer.write_header_to_file(temps[0])
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        temps[1].write_text(modelfile, encoding="utf-8")
        os.replace(temps[0], out_path)
        os.replace(temps[1], modelfile_path(out_path))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ExportError(
                f"no space left on the device of {out_path.parent} while writing "
                f"{out_path.name} (about {num_bytes / 1e6:.0f} MB of tensors); nothing was "
                "written. Free some space or choose a smaller --dtype."
            ) from None
        raise ExportError(f"cannot write {out_path}: {e}") from None
    finally:
        # A no-op after a successful close; after a failure it frees the file, and its flush
        # of what is still buffered fails again on a full disk: that must not skip the clean-up
        # below nor replace the error above (the file is closed even when the flush fails).
        with suppress(OSError):
            writer.close()
        for temp in temps:
            temp.unlink(missing_ok=True)  # gone already once renamed
    return ExportResult(out_path, modelfile_path(out_path), out_path.stat().st_size)


def _temp_sibling(path: Path) -> Path:
    # Same folder, so the final os.replace is an atomic rename on one filesystem.
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    os.chmod(temp, 0o644)  # mkstemp makes it private; the exported file is meant to be shared
    return Path(temp)
