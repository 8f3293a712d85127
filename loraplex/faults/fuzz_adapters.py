"""Fuzz target: a tenant's adapter upload, through the registry's own check (validation.py ->
lora/adapter.py), on the bytes of its two files.

Inputs start as a valid PEFT adapter for the tiny model (a random rank, modules, layers, dtype,
alpha, rsLoRA or not) and get mutations: a field of adapter_config.json set to any JSON value
or removed, its bytes replaced; a safetensors header entry's dtype, shape, offsets or name
changed, the header-length prefix or the header itself replaced, the file cut or extended; a
weight made NaN, Inf or huge; a tensor dropped. Property: an AdapterError, or an adapter whose
rank and modules are the ones written; an unmutated adapter loads, a NaN/Inf or cut one never.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace

import torch
from hypothesis import strategies as st

from loraplex.faults.fuzz import ACCEPTED, Fault, Target, refused
from loraplex.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from loraplex.lora.modules import MLP_MODULES, TARGET_MODULES
from loraplex.model.loader import read_config
from loraplex.validation import adapter_validator

# Every dtype name safetensors has, plus ones it does not.
DTYPE_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3",
               "F6_E3M2", "F4", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
               "C64", "f32", "")
VALID_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CONFIG_KEYS = ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern",
               "alpha_pattern", "use_rslora", "bias", "use_dora", "modules_to_save",
               "fan_in_fan_out", "layer_replication", "task_type", "base_model_name_or_path")
# Regexes a tenant could put in rank_pattern / alpha_pattern, the catastrophic ones included.
PATTERN_KEYS = ("q_proj", "layers.0.self_attn.q_proj", "(", "(.|.)*!", "(a+)+$", ".*.*.*x",
                "^model", "q_proj|v_proj", "(?:q|k)_proj", r"\w+_proj", "[0-9]+")

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                   max_size=4),
    max_leaves=8)


@dataclass
class Draft:
    """An adapter upload being built: config, safetensors header entries and data, and how
    the file is cut, extended or prefixed; `expect` is "ok", "refused" or "either"."""

    config: dict | bytes
    header: dict
    data: bytes
    rank: int
    targets: tuple[str, ...]
    expect: str = "ok"
    length_prefix: int | None = None  # None: the header's true length
    cut: int | None = None  # the file's bytes kept, from the end's point of view
    extra: bytes = b""
    mutations: list[str] = field(default_factory=list)

    def files(self) -> dict[str, bytes]:
        config = self.config if isinstance(self.config, bytes) else json.dumps(
            self.config).encode()
        header = json.dumps(self.header).encode()
        header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes
        prefix = len(header) if self.length_prefix is None else self.length_prefix
        weights = struct.pack("<Q", prefix % 2**64) + header + self.data + self.extra
        if self.cut is not None:
            weights = weights[: max(0, len(weights) - self.cut)]
        return {CONFIG_FILE: config, WEIGHTS_FILE: weights}

    def __repr__(self) -> str:  # what a failure report shows
        return f"Draft(expect={self.expect}, rank={self.rank}, mutations={self.mutations})"


@st.composite
def valid_adapters(draw, model_config) -> Draft:
    rank = draw(st.integers(1, 8))
    chosen = draw(st.lists(st.sampled_from(TARGET_MODULES), min_size=1, unique=True))
    targets = tuple(m for m in TARGET_MODULES if m in chosen)
    layers = sorted(draw(st.lists(st.integers(0, model_config.num_layers - 1), min_size=1,
                                  unique=True)))
    dtype = draw(st.sampled_from(sorted(VALID_DTYPES)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    shapes = model_config.module_shapes()
    header, chunks, offset = {}, [], 0
    for layer in layers:
        for module in targets:
            d_in, d_out = shapes[module]
            part = "mlp" if module in MLP_MODULES else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            for which, shape in (("A", (rank, d_in)), ("B", (d_out, rank))):
                tensor = (torch.randn(*shape, generator=generator) * 0.05).to(VALID_DTYPES[dtype])
                raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
                header[f"{prefix}.lora_{which}.weight"] = {
                    "dtype": dtype, "shape": list(shape),
                    "data_offsets": [offset, offset + len(raw)]}
                chunks.append(raw)
                offset += len(raw)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": draw(st.floats(0.5, 64)),
              "target_modules": list(targets), "use_rslora": draw(st.booleans()),
              "bias": "none", "task_type": "CAUSAL_LM"}
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    return Draft(config, header, b"".join(chunks), rank, targets)


def _tensor_names(draft: Draft) -> list[str]:
    if not isinstance(draft.header, dict):
        return []
    return [name for name in draft.header if name != "__metadata__"]


def _intact(draft: Draft, name: str) -> bool:
    """Whether tensor `name`'s entry still says where its bytes are, in a dtype we write."""
    entry = draft.header[name]
    return isinstance(entry, dict) and entry.get("dtype") in VALID_DTYPES and isinstance(
        entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2


@st.composite
def mutate(draw, draft: Draft) -> Draft:
    """One mutation of `draft` (a copy)."""
    header = draft.header
    if isinstance(header, dict):
        header = {k: dict(v) if isinstance(v, dict) else v for k, v in header.items()}
    draft = replace(draft, config=draft.config if isinstance(draft.config, bytes)
                    else dict(draft.config), header=header, mutations=list(draft.mutations))
    names = _tensor_names(draft)
    kind = draw(st.sampled_from(("config_field", "config_bytes", "pattern", "header_field",
                                 "header_raw", "values", "drop", "cut")))
    either = "refused" if draft.expect == "refused" else "either"
    if kind == "config_field" and isinstance(draft.config, dict):
        key = draw(st.sampled_from(CONFIG_KEYS) | st.text(max_size=8))
        if draw(st.booleans()):
            draft.config.pop(key, None)
            draft.mutations.append(f"config: del {key!r}")
        else:
            draft.config[key] = draw(JSON)
            draft.mutations.append(f"config: {key!r}={draft.config[key]!r}")
        draft.expect = either
    elif kind in ("config_bytes", "config_field"):
        draft.config = draw(st.binary(max_size=64) | st.sampled_from(
            (b"[" * 10_000, b'{"a":' * 5_000, b"null", b"[]", b'"LORA"', b"{}")))
        draft.mutations.append(f"config bytes {draft.config[:40]!r}")
        draft.expect = "refused"
    elif kind == "pattern" and isinstance(draft.config, dict):
        which = draw(st.sampled_from(("rank_pattern", "alpha_pattern")))
        value = draw(st.integers(-1, 9) | st.floats(allow_nan=True))
        draft.config[which] = {draw(st.sampled_from(PATTERN_KEYS) | st.text(max_size=20)): value}
        draft.mutations.append(f"config: {which}={draft.config[which]!r}")
        draft.expect = either
    elif kind == "header_field" and names:
        name = draw(st.sampled_from(names))
        entry = draft.header[name] if isinstance(draft.header[name], dict) else {}
        draft.header[name] = entry
        what = draw(st.sampled_from(("dtype", "shape", "data_offsets", "name")))
        if what == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPE_NAMES) | st.text(max_size=6))
        elif what == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 2**40) | st.integers(0, 70),
                                           max_size=3))
        elif what == "data_offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-1, 2**64 + 1) | st.integers(
                0, len(draft.data) + 8), min_size=0, max_size=3))
        else:
            new = draw(st.sampled_from((
                name.replace("lora_A", "lora_C"), name.replace(".0.", ".99."),
                name.replace("model.model", "model"), name.replace(".weight", ".default.weight"),
                name.replace("q_proj", "embed_tokens"), name.replace("lora_A", "lora_embedding_A"),
            )) | st.text(max_size=20))
            draft.header[new] = draft.header.pop(name)
        draft.mutations.append(f"header: {name}.{what} -> {entry.get(what)!r}"
                               if what != "name" else f"header: {name} renamed {new!r}")
        draft.expect = either
    elif kind == "header_raw":
        how = draw(st.sampled_from(("prefix", "header", "extra")))
        if how == "prefix":
            draft.length_prefix = draw(st.integers(0, 2**64 - 1) | st.integers(0, 4096))
        elif how == "header":
            draft.header = draw(JSON)
        else:
            draft.extra = draw(st.binary(min_size=1, max_size=16))
        draft.mutations.append(f"raw {how}")
        draft.expect = either
    elif kind == "values" and any(_intact(draft, n) for n in names):
        name = draw(st.sampled_from([n for n in names if _intact(draft, n)]))
        value = draw(st.sampled_from((float("nan"), float("inf"), -float("inf"), 3e38, 6e4)))
        draft.data = _poke(draft, name, value)
        draft.mutations.append(f"{name}[0] = {value}")
        draft.expect = "refused" if value != value or abs(value) == float("inf") else either
    elif kind == "drop" and names:
        name = draw(st.sampled_from(names))
        del draft.header[name]  # its bytes stay: safetensors refuses data no tensor holds
        draft.mutations.append(f"dropped {name}")
        draft.expect = "refused"
    else:
        draft.cut = draw(st.integers(1, 64))
        draft.mutations.append(f"cut {draft.cut} bytes")
        draft.expect = "refused"
    return draft


def _poke(draft: Draft, name: str, value: float) -> bytes:
    """The data with the first element of tensor `name` set to `value` (in its own dtype)."""
    entry = draft.header[name]
    start = entry["data_offsets"][0]
    raw = torch.tensor([value]).to(VALID_DTYPES[entry["dtype"]]).view(torch.uint8).numpy()
    return draft.data[:start] + raw.tobytes() + draft.data[start + len(raw):]


@st.composite
def adapters(draw, model_config) -> Draft:
    draft = draw(valid_adapters(model_config))
    for _ in range(draw(st.integers(0, 3))):
        draft = draw(mutate(draft))
    return draft


def adapter_targets(model_dir) -> list[Target]:
    validate = adapter_validator(str(model_dir))

    def check(draft: Draft) -> str:
        try:
            info = validate(draft.files())
        except AdapterError as e:
            return refused(draft.expect, e, "adapter")
        if draft.expect == "refused":
            raise Fault(f"accepted an adapter that must be refused: {info}")
        if draft.expect == "ok" and (info["rank"], tuple(info["target_modules"])) != (
                draft.rank, draft.targets):
            raise Fault(f"loaded as rank {info['rank']} on {info['target_modules']}, written "
                        f"as rank {draft.rank} on {draft.targets}")
        return ACCEPTED

    return [Target("adapter_upload", adapters(read_config(model_dir)), check)]
