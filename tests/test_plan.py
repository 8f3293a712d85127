"""Capacity planning: every figure checked against an independent route (transformers + PEFT
parameter counts, the engine's own slot and KV allocators), the budget's invariants, the errors,
and `loraplex plan` on the default model without pulling it."""

import re
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.lora.modules import TARGET_MODULES
from loraplex.model.known_shapes import KNOWN_MODEL_SHAPES
from loraplex.model.loader import read_config
from loraplex.model.model_config import ModelConfig
from loraplex.plan import (
    PlanError,
    base_weight_bytes,
    count_base_params,
    count_linear_params,
    format_bytes,
    parse_bytes,
    parse_ranks,
    parse_targets,
    plan_capacity,
)

GiB = 2**30
SMOLLM2 = ModelConfig(**KNOWN_MODEL_SHAPES["smollm2-135m"])
TARGET_SPECS = {"all": list(TARGET_MODULES), "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "q_proj,v_proj": ["q_proj", "v_proj"], "down_proj": ["down_proj"]}


def hf_config(**overrides):
    """A tiny llama config in transformers' own terms (GQA, head_dim not hidden/heads)."""
    from transformers import LlamaConfig

    shape = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaConfig(**{**shape, **overrides})


def smollm2_hf_config():
    """SmolLM2-135M-Instruct's shape, spelled out again from its published config.json."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True)


def loraplex_config(hf, tmp_path) -> ModelConfig:
    """The ModelConfig loraplex reads for a transformers config (config.json only)."""
    hf.save_pretrained(tmp_path)
    return read_config(tmp_path)


def meta_model(hf):
    """A transformers model with parameters on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf)


def peft_lora_bytes(hf, rank: int, targets: list[str], itemsize: int) -> int:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(meta_model(hf), LoraConfig(r=rank, target_modules=targets))
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) * itemsize


def plan(config=SMOLLM2, **kwargs):
    args = dict(rank=16, targets="all", clients=50, memory_bytes=24 * GiB)
    return plan_capacity(config, **{**args, **kwargs})


# -- the model's figures, by a second route ------------------------------------------------------
def test_smollm2_rank16_all_fp32_adapter_bytes():
    # Per layer, rank 16 x (in + out): q 576+576, k 576+192, v 576+192, o 576+576,
    # gate 576+1536, up 576+1536, down 1536+576 = 10,176; x 30 layers x 4 bytes.
    assert plan().bytes_per_adapter == 16 * 10_176 * 30 * 4 == 19_537_920
    peft_bytes = peft_lora_bytes(smollm2_hf_config(), 16, TARGET_SPECS["all"], 4)
    assert plan().bytes_per_adapter == peft_bytes


@pytest.mark.parametrize("spec", list(TARGET_SPECS))
@pytest.mark.parametrize("rank", [1, 8])
def test_adapter_bytes_match_peft(spec, rank, tmp_path):
    hf = hf_config()
    p = plan(loraplex_config(hf, tmp_path), rank=rank, targets=spec, memory_bytes=4 * GiB,
             dtype_bytes=2)
    assert p.targets == tuple(TARGET_SPECS[spec])
    assert p.bytes_per_adapter == peft_lora_bytes(hf, rank, TARGET_SPECS[spec], 2)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_base_params_match_transformers(model_type, tied, tmp_path):
    from transformers import Qwen2Config

    if model_type == "llama":
        hf = hf_config(tie_word_embeddings=tied)
    else:  # Qwen2 carries q/k/v biases
        hf = Qwen2Config(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied)
    p = plan(loraplex_config(hf, tmp_path), memory_bytes=4 * GiB, dtype_bytes=2)
    expected = sum(param.numel() for param in meta_model(hf).parameters())
    assert p.num_base_params == expected
    assert p.base_weight_bytes == 2 * expected


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma3", "gemma3-multimodal"])
def test_base_params_of_other_families_match_transformers(family, tmp_path):
    from tests.model.test_families import _config

    hf = _config(family)
    model = meta_model(hf)
    if family == "gemma3-multimodal":  # planned as its language model (its lm_head is tied)
        model = model.model.language_model
    expected = sum(param.numel() for param in model.parameters())
    assert plan(loraplex_config(hf, tmp_path), memory_bytes=4 * GiB).num_base_params == expected


def test_smollm2_base_params_match_transformers():
    expected = sum(param.numel() for param in meta_model(smollm2_hf_config()).parameters())
    assert plan().num_base_params == expected == 134_515_008


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("bfloat16", 2)])
@pytest.mark.parametrize("targets", ["attn", "all"])
@pytest.mark.parametrize("int8", [False, True])
def test_slot_bytes_match_the_engine_slots(dtype, itemsize, targets, int8):
    from loraplex.lora.slots import AdapterSlots
    from loraplex.model.llama import LlamaModel

    with torch.device("meta"):
        model = LlamaModel(SMOLLM2).to(getattr(torch, dtype))
    slots = AdapterSlots(model, max_loras=3, max_rank=8, int8=int8)
    # A slot holds all seven modules, whatever the adapters target.
    assert plan(rank=8, targets=targets, dtype_bytes=itemsize,
                int8_slots=int8).bytes_per_slot == slots.num_bytes() // 3


def test_a_mix_of_ranks_is_planned_by_the_pages_each_takes():
    from loraplex.lora.slots import AdapterSlots
    from loraplex.model.llama import LlamaModel

    with torch.device("meta"):
        model = LlamaModel(SMOLLM2)
    slots = AdapterSlots(model, max_loras=3, max_rank=64, num_pages=10)
    mixed = plan(rank=[8, 16, 32, 64], clients=1000, memory_bytes=4 * GiB)
    rank64 = plan(rank=64, clients=1000, memory_bytes=4 * GiB)
    assert mixed.bytes_per_page == rank64.bytes_per_page == slots.bytes_per_page()
    # 1 + 2 + 4 + 8 pages of 8 rank rows: a mean of 3.75, where rank-max slots take 8 each.
    assert mixed.bytes_per_slot * 4 == 15 * mixed.bytes_per_page
    assert mixed.max_resident_adapters == pytest.approx(
        rank64.max_resident_adapters * 8 / 3.75, rel=0.01)
    assert mixed.rank == 64 and mixed.max_lora_pages * mixed.bytes_per_page == mixed.slot_bytes
    assert mixed.max_lora_pages >= mixed.max_loras * 15 // 4
    # A rank below a page takes a whole page in the slots, and its own bytes in the host cache.
    small = plan(rank=4)
    assert small.bytes_per_slot == small.bytes_per_page == plan(rank=8).bytes_per_slot
    assert small.bytes_per_adapter * 2 == plan(rank=8).bytes_per_adapter
    assert parse_ranks("8,16,32,64") == (8, 16, 32, 64)
    with pytest.raises(PlanError, match="comma list"):
        parse_ranks("8,x")


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("float16", 2)])
def test_kv_bytes_per_token_match_the_engine(dtype, itemsize):
    from loraplex.config import EngineConfig
    from loraplex.engine.model_runner import ModelRunner

    per_block = ModelRunner.kv_bytes_per_block(SimpleNamespace(config=SMOLLM2),
                                               EngineConfig(dtype=dtype, device="cpu"))
    p = plan(dtype_bytes=itemsize)
    assert p.kv_bytes_per_token * EngineConfig().block_size == per_block
    assert p.kv_bytes_per_token == 2 * 30 * 3 * 64 * itemsize


def test_engine_defaults_are_the_ones_planned_for():
    from loraplex import plan as plan_module
    from loraplex.config import EngineConfig
    from loraplex.engine import llm_engine

    assert plan_module.BLOCK_SIZE == EngineConfig().block_size
    assert plan_module.MAX_DEFAULT_MODEL_LEN == llm_engine.MAX_DEFAULT_MODEL_LEN
    assert plan().context_len == 4096  # SmolLM2's 8192 capped


def test_every_default_model_has_a_known_shape():
    from loraplex.model.pull import DEFAULT_MODELS

    assert set(DEFAULT_MODELS) <= set(KNOWN_MODEL_SHAPES)


# Parameter counts the model publishers state (the safetensors metadata on each model's page);
# Gemma 3's are its text model alone (the multimodal checkpoint adds a SigLIP vision tower).
PUBLISHED_PARAMS = {
    "smollm2-135m": 134_515_008, "llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "mistral-7b": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512, "qwen2.5-14b": 14_770_033_664, "qwen2.5-32b": 32_763_876_352,
    "qwen3-8b": 8_190_735_360, "qwen3-14b": 14_768_307_200, "qwen3-32b": 32_762_123_264,
    "phi-4": 14_659_507_200,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_known_shapes_match_published_parameter_counts(name):
    assert count_base_params(ModelConfig(**KNOWN_MODEL_SHAPES[name])) == PUBLISHED_PARAMS[name]


def test_known_gemma3_shapes_are_their_text_models():
    for name in ("gemma-3-4b", "gemma-3-12b", "gemma-3-27b"):
        config = ModelConfig(**KNOWN_MODEL_SHAPES[name])
        assert config.layer_types.count("full_attention") == config.num_layers // 6
    # 27B: 62 layers of width 5376, 32 heads of 128 (q is narrower than the hidden state).
    assert count_base_params(ModelConfig(**KNOWN_MODEL_SHAPES["gemma-3-27b"])) == 27_009_346_304


def test_quantized_base_weights():
    mistral = ModelConfig(**KNOWN_MODEL_SHAPES["mistral-7b"])
    linear = count_linear_params(mistral)
    rest = count_base_params(mistral) - linear
    assert base_weight_bytes(mistral, 2) == 2 * (linear + rest)
    # int8: a byte per linear weight; 4bit: half a byte; both plus a 2-byte scale per 64.
    assert base_weight_bytes(mistral, 2, 8) == linear + linear // 64 * 2 + 2 * rest
    assert base_weight_bytes(mistral, 2, 4) == linear // 2 + linear // 64 * 2 + 2 * rest
    p = plan(mistral, weights="4bit", memory_bytes=24 * GiB, dtype_bytes=2)
    assert p.base_weight_bytes == base_weight_bytes(mistral, 2, 4) < 4 * GiB
    assert p.bytes_per_adapter == plan(mistral, memory_bytes=24 * GiB, dtype_bytes=2
                                       ).bytes_per_adapter  # adapters keep the model's dtype
    with pytest.raises(PlanError, match="weights must be one of auto, int8, 4bit"):
        plan(weights="int4")


def test_storage_one_model_per_client_vs_one_base_and_adapters():
    p = plan(ModelConfig(**KNOWN_MODEL_SHAPES["mistral-7b"]), clients=20, memory_bytes=80 * GiB,
             dtype_bytes=2)
    assert p.dedicated_storage_bytes == 20 * p.base_weight_bytes
    assert p.loraplex_storage_bytes == p.base_weight_bytes + 20 * p.bytes_per_adapter
    assert p.dedicated_storage_bytes > 17 * p.loraplex_storage_bytes


@pytest.mark.real_model
def test_known_shape_matches_the_pulled_model():
    from loraplex.model.pull import resolve_model

    assert SMOLLM2 == read_config(resolve_model("smollm2-135m"))


# -- the budget ----------------------------------------------------------------------------------
MEMORIES = [2 * GiB, 3 * GiB, 8 * GiB, 24 * GiB, 80 * GiB, 141 * GiB]


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("clients", [1, 50, 1000])
def test_budget_adds_up(memory, clients):
    p = plan(memory_bytes=memory, clients=clients)
    assert p.reserve_bytes + p.base_weight_bytes + p.slot_bytes + p.kv_cache_bytes == memory
    assert p.slot_bytes == p.max_loras * p.bytes_per_slot
    assert 1 <= p.max_loras <= min(64, clients, p.max_resident_adapters)
    assert p.max_cpu_loras >= p.max_loras and p.max_cpu_loras <= max(clients, p.max_loras)
    assert p.num_kv_tokens % 16 == 0
    assert p.num_kv_tokens * p.kv_bytes_per_token <= p.kv_cache_bytes
    assert p.num_full_context_seqs == p.num_kv_tokens // 4096 >= 1
    assert p.host_cache_bytes == p.max_cpu_loras * p.bytes_per_adapter


def test_smollm2_in_24gib():
    p = plan()
    assert p.max_loras == 50 and p.max_cpu_loras == 50  # every client fits both tiers
    assert p.reserve_bytes == 24 * GiB // 10 + 512 * 2**20
    assert p.dedicated_bytes == 50 * p.base_weight_bytes + p.kv_cache_bytes
    assert p.loraplex_bytes == p.base_weight_bytes + p.slot_bytes + p.kv_cache_bytes
    assert p.dedicated_ratio == pytest.approx(p.dedicated_bytes / p.loraplex_bytes)
    assert p.dedicated_ratio > 2


def test_more_memory_never_means_less():
    start = plan(memory_bytes=24 * GiB).min_memory_bytes
    memories = [start + step for step in range(0, 4000, 7)]
    memories += [int(start * 1.07**k) for k in range(60)]
    previous = None
    for memory in sorted(memories):
        p = plan(memory_bytes=memory, clients=200, host_memory_bytes=8 * GiB)
        if previous is not None:
            assert p.max_loras >= previous.max_loras
            assert p.num_kv_tokens >= previous.num_kv_tokens
            assert p.max_resident_adapters >= previous.max_resident_adapters
        previous = p
    assert previous.max_loras == 64  # the cap, with memory to spare


def test_slots_are_capped_by_clients_and_the_cap():
    assert plan(clients=3).max_loras == 3 and plan(clients=3).max_cpu_loras == 3
    assert plan(clients=500, memory_bytes=80 * GiB).max_loras == 64


def test_host_cache_holds_what_its_share_allows():
    p = plan(clients=1000, host_memory_bytes=16 * GiB)
    assert p.max_cpu_loras == 4 * GiB // p.bytes_per_adapter > p.max_loras  # a quarter of RAM
    tiny_host = plan(clients=1000, host_memory_bytes=2**20)
    assert tiny_host.max_cpu_loras == tiny_host.max_loras  # never below the device slots


def test_smallest_budget_is_exact_and_stated():
    smallest = plan(memory_bytes=24 * GiB).min_memory_bytes
    p = plan(memory_bytes=smallest)
    assert p.max_loras == 1 and p.num_full_context_seqs == 1
    with pytest.raises(PlanError, match=rf"at least .* \({smallest} bytes\) is needed"):
        plan(memory_bytes=smallest - 1)


def test_budget_below_the_base_model_says_what_is_needed():
    with pytest.raises(PlanError) as info:
        plan(memory_bytes=256 * 2**20)
    message = str(info.value)
    assert "256.0 MiB is too little" in message
    assert f"base model needs {format_bytes(plan().base_weight_bytes)}" in message
    assert "at least 1.3 GiB" in message


# -- bad inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("rank", 0), ("rank", -4), ("rank", 1.5), ("rank", True), ("clients", 0),
    ("memory_bytes", -GiB), ("dtype_bytes", 0), ("host_memory_bytes", 0),
])
def test_bad_numbers_are_named(field, value):
    with pytest.raises(PlanError, match=f"{field} must be a positive integer"):
        plan(**{field: value})


@pytest.mark.parametrize("spec", ["q_proj,lm_head", "mlp", "", "q_proj,,v_proj"])
def test_unknown_targets_list_the_valid_ones(spec):
    with pytest.raises(PlanError, match="use 'all', 'attn' or a comma list of: q_proj, k_proj"):
        parse_targets(spec)


def test_target_lists_are_deduplicated_in_model_order():
    assert parse_targets(" v_proj , q_proj,v_proj") == ("q_proj", "v_proj")
    assert parse_targets(["up_proj", "q_proj"]) == ("q_proj", "up_proj")


@pytest.mark.parametrize(("text", "expected"), [
    ("24GiB", 24 * GiB), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9), ("1.5GiB", 3 * GiB // 2),
    ("1000000", 10**6), ("24 GiB", 24 * GiB), ("64kib", 64 * 1024), ("100B", 100),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["24 GiBs", "24G", "GiB", "", "1e9", "twelve", "1,5GiB"])
def test_parse_bytes_rejects_unreadable_sizes(text):
    with pytest.raises(PlanError, match="cannot read memory size"):
        parse_bytes(text)


@pytest.mark.parametrize("text", ["-1GiB", "0", "0GiB", "0.1B"])
def test_parse_bytes_rejects_sizes_that_are_not_positive(text):
    with pytest.raises(PlanError, match="memory size must be positive"):
        parse_bytes(text)


def test_format_bytes():
    assert format_bytes(100) == "100 B"
    assert format_bytes(19_537_920) == "18.6 MiB"
    assert format_bytes(24 * GiB) == "24.0 GiB"
    assert format_bytes(3 * 2**40) == "3.0 TiB"


# -- the command line ----------------------------------------------------------------------------
runner = CliRunner()


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns otherwise
    return tmp_path


def test_cli_plans_the_default_model_without_pulling_it(empty_home):
    result = runner.invoke(app, ["plan", "--model", "smollm2-135m", "--rank", "16",
                                 "--targets", "all", "--clients", "50", "--memory", "24GiB"])
    assert result.exit_code == 0, result.output
    assert "--max-loras 50 --max-lora-pages 100 --max-cpu-loras 50" in result.output
    assert "18.6 MiB" in result.output and "134,515,008 parameters" in result.output
    assert not (empty_home / "models").exists()  # nothing was pulled


def test_cli_plans_int8_slots(empty_home):
    args = ["plan", "--model", "smollm2-135m", "--clients", "500", "--memory", "2GiB",
            "--dtype", "bfloat16"]
    bf16 = runner.invoke(app, args)
    int8 = runner.invoke(app, [*args, "--lora-dtype", "int8"])
    assert bf16.exit_code == int8.exit_code == 0, int8.output
    assert "--dtype bfloat16 --max-lora-rank 16 --lora-dtype int8 --max-loras" in int8.output
    assert "int8 with a scale per rank row" in int8.output
    slots = [int(re.search(r"--max-loras (\d+)", r.output)[1]) for r in (bf16, int8)]
    assert slots[1] > 1.9 * slots[0]  # half the bytes a slot: about twice the slots


def test_cli_plans_a_mix_of_ranks_by_their_pages(empty_home):
    args = ["plan", "--model", "smollm2-135m", "--clients", "1000", "--memory", "4GiB"]
    rank64 = runner.invoke(app, [*args, "--rank", "64"])
    mixed = runner.invoke(app, [*args, "--rank", "8,16,32,64"])
    assert rank64.exit_code == mixed.exit_code == 0, mixed.output
    assert "--max-lora-rank 64" in mixed.output and "the mean of its pages" in mixed.output
    pages = [int(re.search(r"--max-lora-pages (\d+)", r.output)[1]) for r in (rank64, mixed)]
    slots = [int(re.search(r"--max-loras (\d+)", r.output)[1]) for r in (rank64, mixed)]
    assert pages[0] == 8 * slots[0] and slots[1] >= 2 * slots[0]  # 3.75 pages each, not 8
    bad = runner.invoke(app, [*args, "--rank", "8,x"])
    assert bad.exit_code != 0 and "comma list" in bad.output


def test_cli_reads_a_checkpoint_dir(empty_home, tmp_path):
    hf_config().save_pretrained(tmp_path / "ckpt")
    result = runner.invoke(app, ["plan", "--model", str(tmp_path / "ckpt"), "--clients", "3",
                                 "--memory", "2GiB", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert ("--dtype bfloat16 --max-lora-rank 16 --max-loras 3 --max-lora-pages 6 "
            "--max-cpu-loras 3") in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--memory", "24 GiBs"], "cannot read memory size '24 GiBs'"),
    (["--memory", "100MiB"], "is too little"),
    (["--targets", "lm_head"], "unknown target module(s) 'lm_head'"),
    (["--dtype", "int8"], "dtype must be one of float32, bfloat16, float16"),
    (["--lora-dtype", "int4"], "lora_dtype must be one of auto, int8, got 'int4'"),
    (["--model", "/nonexistent/model"], "known models: smollm2-135m, llama-3.1-8b"),
    (["--weights", "int4"], "weights must be one of auto, int8, 4bit"),
])
def test_cli_errors_are_one_clear_line(empty_home, args, message):
    result = runner.invoke(app, ["plan", *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("model", ["llama-3.1-70b", "qwen3-32b", "gemma-3-27b", "phi-4"])
def test_cli_plans_popular_models_by_name(empty_home, model):
    result = runner.invoke(app, ["plan", "--model", model, "--clients", "20", "--memory",
                                 "80GiB", "--dtype", "bfloat16", "--weights", "4bit"])
    assert result.exit_code == 0, result.output
    assert "4bit base" in result.output and "sized as 4bit weights" in result.output
    assert "Run loraplex serve" not in result.output  # its flags are for a base in --dtype
    assert not (empty_home / "models").exists()


def test_cli_reads_a_config_json(empty_home, tmp_path):
    hf_config().save_pretrained(tmp_path / "ckpt")
    result = runner.invoke(app, ["plan", "--model", str(tmp_path / "ckpt" / "config.json"),
                                 "--clients", "3", "--memory", "2GiB"])
    assert result.exit_code == 0, result.output
    assert "--max-loras 3 --max-lora-pages 6 --max-cpu-loras 3" in result.output
    assert "storage on disk" in result.output
