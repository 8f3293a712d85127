"""load_adapter against real PEFT adapters: the folded weights reproduce PEFT's deltas, and every
way an adapter can be unusable is refused with a message naming the adapter and the reason."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.lora.adapter import AdapterError, LoRAWeights, load_adapter
from loraplex.lora.modules import (
    ATTENTION_MODULES,
    DOWN_PROJ,
    K_PROJ,
    Q_PROJ,
    TARGET_MODULES,
    UP_PROJ,
    V_PROJ,
)
from tests.conftest import make_peft_adapter, module_shapes, tiny_llama

NUM_LAYERS = 2
MAX_RANK = 64
PREFIX = "base_model.model.model.layers"  # how PEFT names a llama layer's tensors
Q0_A = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
Q0_B = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="session")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def shapes(base_model) -> dict[str, tuple[int, int]]:
    return module_shapes(base_model)


@pytest.fixture(scope="session")
def plain_adapter(base_model, tmp_path_factory) -> Path:
    """r=4, alpha=8 on all seven modules; copy it before editing (see `adapter`)."""
    path = tmp_path_factory.mktemp("plain_adapter")
    make_peft_adapter(base_model, path, r=4, lora_alpha=8, target_modules=TARGET_MODULES)
    return path


@pytest.fixture
def adapter(plain_adapter, tmp_path) -> Path:
    """A private copy of plain_adapter that a test may break."""
    return Path(shutil.copytree(plain_adapter, tmp_path / "adapter"))


def load(path, shapes, **overrides) -> LoRAWeights:
    kwargs = {"num_layers": NUM_LAYERS, "module_shapes": shapes, "max_rank": MAX_RANK}
    return load_adapter(path, **(kwargs | overrides))


def edit_config(path: Path, **changes) -> None:
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | changes))


def edit_tensors(path: Path, edit) -> None:
    """Rewrite adapter_model.safetensors with edit(tensors) applied to its dict of tensors."""
    weights_file = path / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    edit(tensors)
    save_file(tensors, weights_file)


def refusal(path: Path, shapes, *keywords: str, **overrides) -> str:
    """Assert load_adapter refuses path with a message naming it and every keyword."""
    with pytest.raises(AdapterError) as info:
        load(path, shapes, **overrides)
    message = str(info.value)
    assert str(path) in message
    for keyword in keywords:
        assert keyword in message
    return message


def peft_layer(peft_model, layer: int, name: str):
    parent = "self_attn" if name in ATTENTION_MODULES else "mlp"
    return peft_model.get_submodule(f"base_model.model.model.layers.{layer}.{parent}.{name}")


# --- loading ---


def test_loads_ranks_and_modules(tiny_llama_dir, shapes, tmp_path):
    targets = [V_PROJ, DOWN_PROJ, Q_PROJ]
    make_peft_adapter(tiny_llama_dir, tmp_path, r=4, lora_alpha=8, target_modules=targets)
    lora = load(str(tmp_path), shapes)
    assert lora.path == tmp_path
    assert lora.rank == 4
    assert lora.target_modules == (Q_PROJ, V_PROJ, DOWN_PROJ)  # TARGET_MODULES order
    pairs = dict(lora.pairs())
    assert set(pairs) == {(i, m) for i in range(NUM_LAYERS) for m in lora.target_modules}
    for (_, name), (a, b) in pairs.items():
        in_features, out_features = shapes[name]
        assert a.shape == (4, in_features) and b.shape == (out_features, 4)
        assert a.dtype == b.dtype == torch.float32 and a.device.type == "cpu"


# Module names, full paths and partial paths, matched the way PEFT matches them.
PATTERNS = {
    "rank_pattern": {Q_PROJ: 8, "model.layers.1.mlp.down_proj": 2},
    "alpha_pattern": {V_PROJ: 32, "layers.0.mlp.up_proj": 3},
}


@pytest.mark.parametrize(
    "r, alpha, use_rslora, extra",
    [
        (4, 8, False, {}),
        (8, 16, True, {}),
        (4, 8, False, PATTERNS),
        (4, 8, True, {"rank_pattern": {K_PROJ: 16}, "alpha_pattern": {UP_PROJ: 5}}),
    ],
    ids=["plain", "rslora", "patterns", "rslora-patterns"],
)
def test_delta_matches_peft(base_model, shapes, tmp_path, r, alpha, use_rslora, extra):
    peft_model = make_peft_adapter(
        base_model, tmp_path, r, alpha, TARGET_MODULES, use_rslora=use_rslora, **extra
    )
    lora = load(tmp_path, shapes)
    assert lora.rank == max([r, *extra.get("rank_pattern", {}).values()])
    pairs = dict(lora.pairs())
    assert len(pairs) == NUM_LAYERS * len(TARGET_MODULES)
    torch.manual_seed(1)
    for (layer, name), (a, b) in pairs.items():
        peft_linear = peft_layer(peft_model, layer, name)
        assert a.shape[0] == peft_linear.r["default"]  # rank_pattern honoured per module
        x = torch.randn(3, a.shape[1])  # [tokens, in_features]
        with torch.no_grad():
            expected = peft_linear(x) - peft_linear.base_layer(x)  # [tokens, out_features]
            expected_weight = peft_linear.get_delta_weight("default")  # [out, in]
        torch.testing.assert_close(x @ a.T @ b.T, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b @ a, expected_weight, rtol=1e-4, atol=1e-6)


def test_bf16_conversion(adapter, shapes):
    # scaling 7 / 4 is not a power of two, so folding it in bf16 would round differently.
    edit_config(adapter, lora_alpha=7)
    full = load(adapter, shapes)
    half = load(adapter, shapes, dtype=torch.bfloat16)
    assert half.num_bytes() * 2 == full.num_bytes()
    full_pairs = dict(full.pairs())
    for key, (a, b) in half.pairs():
        assert a.dtype == b.dtype == torch.bfloat16
        # Cast once from the float32 fold, not folded in bf16.
        assert torch.equal(a, full_pairs[key][0].to(torch.bfloat16))
        assert torch.equal(b, full_pairs[key][1].to(torch.bfloat16))


def test_num_bytes(adapter, shapes):
    lora = load(adapter, shapes)
    # 2 layers x (q, k, v, o, gate, up, down) x rank 4 x (in + out) x 4 bytes
    per_layer = sum(in_f + out_f for in_f, out_f in shapes.values())
    assert lora.num_bytes() == NUM_LAYERS * 4 * per_layer * 4


def test_accepts_adapter_name_in_keys(adapter, shapes):
    expected = load(adapter, shapes)

    def add_adapter_name(tensors):
        for key in list(tensors):
            tensors[key.replace(".weight", ".default.weight")] = tensors.pop(key)

    edit_tensors(adapter, add_adapter_name)
    lora = load(adapter, shapes)
    expected_pairs = dict(expected.pairs())
    pairs = dict(lora.pairs())
    assert set(pairs) == set(expected_pairs)
    for key, (a, b) in pairs.items():
        assert torch.equal(a, expected_pairs[key][0]) and torch.equal(b, expected_pairs[key][1])


# --- refusals: files ---


def test_refuses_missing_directory(tmp_path, shapes):
    refusal(tmp_path / "nope", shapes, "does not exist")


def test_refuses_file_instead_of_directory(tmp_path, shapes):
    (tmp_path / "file").write_text("x")
    refusal(tmp_path / "file", shapes, "not a directory")


def test_refuses_missing_config(adapter, shapes):
    (adapter / "adapter_config.json").unlink()
    refusal(adapter, shapes, "adapter_config.json", "missing")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_refuses_invalid_json(adapter, shapes, text):
    (adapter / "adapter_config.json").write_text(text)
    refusal(adapter, shapes, "adapter_config.json", "JSON")


def test_refuses_missing_safetensors(adapter, shapes):
    (adapter / "adapter_model.safetensors").unlink()
    refusal(adapter, shapes, "adapter_model.safetensors", "missing")


def test_refuses_pickle_without_opening_it(adapter, shapes, monkeypatch):
    weights_file = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights_file), adapter / "adapter_model.bin")
    weights_file.unlink()

    def never(*args, **kwargs):
        raise AssertionError("the pickle file was opened")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    refusal(adapter, shapes, "adapter_model.bin", "pickle", "converted to safetensors")


def test_refuses_garbage_safetensors(adapter, shapes):
    (adapter / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    refusal(adapter, shapes, "adapter_model.safetensors", "corrupt")


def test_refuses_truncated_safetensors(adapter, shapes):
    weights_file = adapter / "adapter_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])
    refusal(adapter, shapes, "adapter_model.safetensors", "corrupt")


# --- refusals: config ---


@pytest.mark.parametrize(
    "option, value",
    [
        ("use_dora", True),
        ("modules_to_save", ["lm_head"]),
        ("fan_in_fan_out", True),
        ("lora_bias", True),
        ("use_qalora", True),
        ("trainable_token_indices", [1, 2]),
        ("alora_invocation_tokens", [5]),
        ("layer_replication", [[0, 2]]),
        ("target_parameters", ["experts.gate_up_proj"]),
    ],
)
def test_refuses_unsupported_option(adapter, shapes, option, value):
    edit_config(adapter, **{option: value})
    refusal(adapter, shapes, "adapter_config.json", option)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_refuses_bias(adapter, shapes, bias):
    edit_config(adapter, bias=bias)
    refusal(adapter, shapes, "bias", bias)


@pytest.mark.parametrize("peft_type", ["LOHA", None])
def test_refuses_other_peft_type(adapter, shapes, peft_type):
    edit_config(adapter, peft_type=peft_type)
    refusal(adapter, shapes, "peft_type", "only LORA")


@pytest.mark.parametrize(
    "changes", [{"r": 0}, {"r": "4"}, {"r": True}, {"lora_alpha": None}], ids=repr
)
def test_refuses_bad_r_or_alpha(adapter, shapes, changes):
    edit_config(adapter, **changes)
    refusal(adapter, shapes, "positive r")


@pytest.mark.parametrize(
    "field, pattern",
    [("rank_pattern", {"q_proj": "big"}), ("alpha_pattern", {"(": 4}), ("rank_pattern", [4])],
)
def test_refuses_bad_pattern(adapter, shapes, field, pattern):
    edit_config(adapter, **{field: pattern})
    refusal(adapter, shapes, "invalid", field)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_refuses_embedding_and_lm_head_targets(base_model, shapes, tmp_path, target):
    make_peft_adapter(base_model, tmp_path, r=4, lora_alpha=8, target_modules=[Q_PROJ, target])
    refusal(tmp_path, shapes, "adapter_config.json", target, "not supported")


# --- refusals: tensors ---


def test_refuses_lora_embedding_tensor(adapter, shapes):
    def add(tensors):
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 128)

    edit_tensors(adapter, add)
    refusal(adapter, shapes, "lora_embedding_A", "not supported")


@pytest.mark.parametrize(
    "module",
    [
        "lm_head",  # config does not say so, but a tensor does
        "model.layers.0.self_attn.qkv",  # no such projection
        "model.layers.0.mlp.q_proj",  # right name, wrong block
        "model.layers.0.mlp.qkv_proj",  # a fused projection (Phi-3) in the wrong block
        "model.vision_tower.encoder.layers.0.self_attn.q_proj",  # Gemma 3's vision tower
        "model.norm",
    ],
)
def test_refuses_unknown_target_module(adapter, shapes, module):
    def add(tensors):
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(4, 64)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(64, 4)

    edit_tensors(adapter, add)
    refusal(adapter, shapes, module, "not supported")


@pytest.mark.parametrize(
    "key",
    [
        f"{PREFIX}.0.self_attn.q_proj.lora_B.bias",
        f"{PREFIX}.0.self_attn.q_proj.base_layer.weight",
        f"{PREFIX}.0.mlp.down_proj.lora_magnitude_vector",
        "something_else",
    ],
)
def test_refuses_unexpected_key(adapter, shapes, key):
    edit_tensors(adapter, lambda tensors: tensors.update({key: torch.zeros(64)}))
    refusal(adapter, shapes, "unexpected tensor", key)


def test_refuses_layer_beyond_base_model(adapter, shapes):
    refusal(adapter, shapes, "layer 1", "num_layers=1", num_layers=1)


@pytest.mark.parametrize("drop, missing", [(Q0_B, "no lora_B"), (Q0_A, "no lora_A")])
def test_refuses_unpaired_tensor(adapter, shapes, drop, missing):
    edit_tensors(adapter, lambda tensors: tensors.pop(drop))
    refusal(adapter, shapes, missing, "model.layers.0.self_attn.q_proj")


def test_refuses_duplicate_tensor(adapter, shapes):
    def duplicate(tensors):
        tensors[Q0_A.replace(".weight", ".other.weight")] = tensors[Q0_A].clone()

    edit_tensors(adapter, duplicate)
    refusal(adapter, shapes, "more than one lora_A")


def test_refuses_in_features_mismatch(adapter, shapes):
    message = refusal(adapter, shapes, module_shapes=shapes | {Q_PROJ: (128, 64)})
    assert "lora_A for layers.0.self_attn.q_proj has shape (4, 64)" in message
    assert "takes 128 inputs" in message


def test_refuses_out_features_mismatch(adapter, shapes):
    narrow_k = shapes | {K_PROJ: (64, 16)}
    refusal(
        adapter,
        shapes,
        "lora_B for layers.0.self_attn.k_proj",
        "has 16 outputs",
        module_shapes=narrow_k,
    )


def test_refuses_rank_mismatch_between_a_and_b(adapter, shapes):
    edit_tensors(adapter, lambda tensors: tensors.update({Q0_A: tensors[Q0_A][:3]}))
    refusal(adapter, shapes, "rank mismatch", "layers.0.self_attn.q_proj")


def test_refuses_rank_not_matching_config(adapter, shapes):
    edit_config(adapter, r=2)
    refusal(adapter, shapes, "rank 4", "r=2")


def test_refuses_rank_not_matching_rank_pattern(adapter, shapes):
    edit_config(adapter, rank_pattern={"layers.1.mlp.up_proj": 8})
    refusal(adapter, shapes, "layers.1.mlp.up_proj has rank 4", "r=8")


def test_refuses_rank_above_max_rank(adapter, shapes):
    refusal(adapter, shapes, "rank 4", "max_rank 2", "raise max_rank", max_rank=2)


def test_refuses_module_the_base_model_lacks(adapter, shapes):
    without_o = {name: shape for name, shape in shapes.items() if name != "o_proj"}
    refusal(adapter, shapes, "o_proj", "does not have", module_shapes=without_o)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_refuses_non_finite_tensor(adapter, shapes, bad):
    key = f"{PREFIX}.1.mlp.gate_proj.lora_B.weight"

    def poison(tensors):
        tensors[key][5, 2] = bad

    edit_tensors(adapter, poison)
    refusal(adapter, shapes, key, "NaN or Inf")


def test_refuses_integer_tensor(adapter, shapes):
    edit_tensors(adapter, lambda tensors: tensors.update({Q0_A: tensors[Q0_A].to(torch.int32)}))
    refusal(adapter, shapes, Q0_A, "float")


def test_refuses_adapter_without_lora_tensors(adapter, shapes):
    save_file({}, adapter / "adapter_model.safetensors")
    refusal(adapter, shapes, "adapter_model.safetensors", "no LoRA tensors")


def in_memory(adapter: Path, changes: dict[str, bytes | None] | None = None) -> dict:
    """The adapter's files as bytes (a sealed artifact's, decrypted); a change of None drops
    that file."""
    files = {p.name: p.read_bytes() for p in adapter.iterdir()} | (changes or {})
    return {name: data for name, data in files.items() if data is not None}


def test_files_from_memory_load_as_the_directory_does(adapter, shapes):
    want = load_adapter(adapter, num_layers=NUM_LAYERS, module_shapes=shapes, max_rank=16)
    files = in_memory(adapter)
    got = load_adapter("artifacts/acme/sha", num_layers=NUM_LAYERS, module_shapes=shapes,
                       max_rank=16, read_files=lambda: files)
    assert got.layer_ranks == want.layer_ranks
    assert all(torch.equal(got.modules[m][i], want.modules[m][i])
               for m in want.modules for i in (0, 1))


@pytest.mark.parametrize("changes, words", [
    ({"adapter_config.json": None}, ("adapter_config.json", "missing")),
    ({"adapter_model.safetensors": None}, ("adapter_model.safetensors", "missing")),
    ({"adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"},
     ("corrupt or truncated",)),
    ({"adapter_config.json": b"{not json"}, ("adapter_config.json", "JSON")),
])
def test_files_from_memory_are_checked_like_files(adapter, shapes, changes, words):
    files = in_memory(adapter, changes)
    with pytest.raises(AdapterError) as refused:
        load_adapter("upload", num_layers=NUM_LAYERS, module_shapes=shapes, max_rank=16,
                     read_files=lambda: files)
    assert str(refused.value).startswith("adapter upload: ")
    assert all(word in str(refused.value) for word in words)


# --- refusals found by fuzzing (loraplex/faults/fuzz_adapters.py): each was an unexpected
# exception (a 500 on upload), a hang, or an adapter served silently wrong ---


@pytest.mark.parametrize("changes, words", [
    ({"target_modules": 5}, "invalid target_modules"),  # was a TypeError
    ({"target_modules": [1, 2]}, "invalid target_modules"),
    ({"lora_alpha": float("nan")}, "numeric lora_alpha"),  # was served: every delta NaN
    ({"r": float("inf")}, "positive r"),
    ({"use_rslora": "false"}, "use_rslora"),  # was read as true
    ({"rank_pattern": {"(.|.)*!": 4}}, "too complex"),  # was a hang (regex backtracking)
    ({"alpha_pattern": {"(a+)+$": 4}}, "too complex"),
    ({"lora_alpha": 1e308}, "overflows"),  # was served: every delta Inf
], ids=repr)
def test_refuses_config_found_by_fuzzing(adapter, shapes, changes, words):
    edit_config(adapter, **changes)
    refusal(adapter, shapes, words)


def test_pattern_keys_with_one_quantifier_still_work(adapter, shapes):
    edit_config(adapter, rank_pattern={r"layers\.\d+\.self_attn.q_proj": 4, "(?:k|v)_proj": 4})
    assert load(adapter, shapes).rank == 4


def test_refuses_deeply_nested_config(adapter, shapes):
    (adapter / "adapter_config.json").write_bytes(b"[" * 100_000)  # was a RecursionError
    refusal(adapter, shapes, "nested too deeply")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_refuses_float8_tensor(adapter, shapes, dtype):  # was a NotImplementedError (sum)
    edit_tensors(adapter, lambda tensors: tensors.update({Q0_A: tensors[Q0_A].to(dtype)}))
    refusal(adapter, shapes, Q0_A, "float")


def test_refuses_rank_zero(adapter, shapes):  # was a ZeroDivisionError (the scaling)
    edit_config(adapter, rank_pattern={"q_proj": 0})
    edit_tensors(adapter, lambda tensors: tensors.update({
        Q0_A: tensors[Q0_A][:0], Q0_B: tensors[Q0_B][:, :0]}))
    refusal(adapter, shapes, "rank 0")


def test_refuses_dtype_without_a_torch_type(adapter, shapes):  # was a KeyError
    header = json.dumps({Q0_A: {"dtype": "F8_E8M0", "shape": [4, 64],
                                "data_offsets": [0, 256]}}).encode()
    header += b" " * (-len(header) % 8)
    data = len(header).to_bytes(8, "little") + header + bytes(256)
    (adapter / "adapter_model.safetensors").write_bytes(data)
    refusal(adapter, shapes, "float8_e8m0")  # from a file, torch has the type: not a float we use
    files = {name: (adapter / name).read_bytes()
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    with pytest.raises(AdapterError, match="dtype 'F8_E8M0', which has no torch type"):
        load(adapter, shapes, read_files=lambda: files)  # from bytes, safetensors.torch has none
