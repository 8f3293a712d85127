"""GGUF export on a tiny model: llama.cpp against transformers + PEFT, refusals, atomicity."""

from __future__ import annotations

import errno
import shutil

import gguf
import numpy as np
import pytest
import torch

from loraplex.export.errors import ExportError
from loraplex.export.gguf import export_adapter, export_merged, permute_qk
from loraplex.export.modelfile import chatml_default_system
from loraplex.model.pull import unpermute_qk
from loraplex.model.tokenizer import Tokenizer
from tests.conftest import make_peft_adapter
from tests.export.conftest import load_llama_cpp

TEXTS = ["The capital of France is Paris.", "Count: 1 2 3 10 42 2024!",
         "<|im_start|>user\nHello, world!<|im_end|>\n", "  two  spaces\n\nand lines"]


def llama_cpp_logits(model_path, tokens, lora_path=None) -> np.ndarray:
    """llama.cpp's logits at every position of one prompt: [len(tokens), vocab]."""
    llm = load_llama_cpp(model_path, lora_path, n_ctx=64, logits_all=True)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


@pytest.fixture(scope="module")
def peft_adapter(bpe_llama_dir, tmp_path_factory):
    """(adapter dir, PeftModel): rslora, and a rank pattern, so ranks differ between modules."""
    path = tmp_path_factory.mktemp("adapter")
    peft_model = make_peft_adapter(
        bpe_llama_dir, path, r=8, lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"],
        use_rslora=True, rank_pattern={"k_proj": 4}, seed=3,
    )
    return path, peft_model


def test_permute_qk_inverts_pull_unpermute():
    weight = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)  # 3 heads of head_dim 8
    assert np.array_equal(unpermute_qk(permute_qk(weight, 3), 3), weight)
    # Head 0 rows 0..3 (first half) and 4..7 (second half) become pairs: 0, 4, 1, 5, ...
    assert permute_qk(weight, 3)[:8, 0].tolist() == [0, 20, 5, 25, 10, 30, 15, 35]


def test_tokenizer_matches_llama_cpp(bpe_llama_dir, tmp_path):
    export_merged(bpe_llama_dir, tmp_path / "m.gguf", "f32")
    llm = load_llama_cpp(tmp_path / "m.gguf", vocab_only=True)
    ours = Tokenizer(bpe_llama_dir)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours.encode(text), text
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]"  # rows past the tokenizer's vocab


def test_merged_and_adapter_only_match_peft(bpe_llama_dir, peft_adapter, tmp_path):
    """llama.cpp runs the base, the merged model and base + LoRA GGUF like transformers + PEFT
    (f32 weights and KV cache, so the bound is float rounding: measured 6e-6 to 1.5e-5)."""
    adapter_dir, peft_model = peft_adapter
    tokens = Tokenizer(bpe_llama_dir).encode(TEXTS[0] + TEXTS[1])
    with torch.no_grad():
        want = peft_model(torch.tensor([tokens])).logits[0].numpy()
        with peft_model.disable_adapter():
            want_base = peft_model(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(want - want_base).max() > 0.1  # the adapter matters

    export_merged(bpe_llama_dir, tmp_path / "base.gguf", "f32")
    export_merged(bpe_llama_dir, tmp_path / "merged.gguf", "f32", adapter_dir)
    export_adapter(bpe_llama_dir, adapter_dir, tmp_path / "lora.gguf", "f32",
                   base_gguf="./base.gguf")
    got_base = llama_cpp_logits(tmp_path / "base.gguf", tokens)
    got_merged = llama_cpp_logits(tmp_path / "merged.gguf", tokens)
    got_lora = llama_cpp_logits(tmp_path / "base.gguf", tokens, lora_path=tmp_path / "lora.gguf")
    for got, reference in ((got_base, want_base), (got_merged, want), (got_lora, want)):
        print(f"max abs logit difference {np.abs(got - reference).max():.1e}")
        assert np.abs(got - reference).max() < 1e-4


def test_adapter_gguf_layout(bpe_llama_dir, peft_adapter, tmp_path):
    adapter_dir, _ = peft_adapter
    export_adapter(bpe_llama_dir, adapter_dir, tmp_path / "lora.gguf", "q8_0",
                   base_gguf="./base.gguf")
    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    # B is stored pre-scaled, every pair padded to rank 8, so llama.cpp's alpha / rank is 1.
    assert reader.get_field("adapter.lora.alpha").contents() == 8.0
    tensors = {t.name: t for t in reader.tensors}
    a, b = tensors["blk.0.attn_k.weight.lora_a"], tensors["blk.0.attn_k.weight.lora_b"]
    assert a.shape.tolist() == [64, 8] and b.shape.tolist() == [8, 32]  # GGUF order: inner first
    # q8_0 needs whole 32-value rows: A's rows (64 inputs) have them, B's (rank 8) do not.
    assert a.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert b.tensor_type == gguf.GGMLQuantizationType.F16
    modelfile = (tmp_path / "lora.Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./lora.gguf\n" in modelfile


def test_modelfile_translates_chatml(bpe_llama_dir, tmp_path):
    export_merged(bpe_llama_dir, tmp_path / "m.gguf", "f16")
    modelfile = (tmp_path / "m.Modelfile").read_text()
    assert "FROM ./m.gguf\n" in modelfile
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" not in modelfile


def test_non_chatml_template_is_left_to_ollama(bpe_llama_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(bpe_llama_dir, model_dir)
    (model_dir / "tokenizer_config.json").write_text(
        '{"chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\\n{% endfor %}"}'
    )
    assert chatml_default_system(Tokenizer(model_dir)) is None


def test_refuses_to_overwrite_without_force(bpe_llama_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_merged(bpe_llama_dir, out, "f32")
    assert out.read_bytes() == b"keep me"
    out.unlink()
    (tmp_path / "m.Modelfile").write_text("keep me")  # the Modelfile counts too
    with pytest.raises(ExportError, match="m.Modelfile already exists"):
        export_merged(bpe_llama_dir, out, "f32")
    export_merged(bpe_llama_dir, out, "f32", force=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_unknown_dtype(bpe_llama_dir, tmp_path):
    with pytest.raises(ExportError, match="unknown dtype 'int4'; choose one of f32, f16, bf16"):
        export_merged(bpe_llama_dir, tmp_path / "m.gguf", "int4")


def test_unsupported_tokenizer_is_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(ExportError, match="only byte-level BPE"):
        export_merged(tiny_llama_dir, tmp_path / "m.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def _fail_mid_write(monkeypatch, exc: Exception):
    """Make the writer put some tensor bytes on disk, then fail."""
    def write_some_then_fail(self, *args, **kwargs):
        self.fout[0].write(b"\0" * 4096)
        raise exc

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_some_then_fail)


def test_failure_mid_write_leaves_nothing(bpe_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    _fail_mid_write(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        export_merged(bpe_llama_dir, out, "f32")
    assert list(tmp_path.iterdir()) == []  # no GGUF, no Modelfile, no temp file


def test_failure_mid_write_keeps_the_old_file(bpe_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old export")
    _fail_mid_write(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        export_merged(bpe_llama_dir, out, "f32", force=True)
    assert out.read_bytes() == b"old export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_full_disk_is_a_clear_error(bpe_llama_dir, tmp_path, monkeypatch):
    _fail_mid_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ExportError, match="no space left .* nothing was written"):
        export_merged(bpe_llama_dir, tmp_path / "m.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype, file_type, max_diff", [
    # Measured on logits up to 4.4: f16 8e-3, bf16 6e-2 (8 mantissa bits to f16's 11), q8_0 0.2
    # (8-bit weights, and llama.cpp makes the activations 8-bit too). Bounds: about twice that.
    ("f16", gguf.LlamaFileType.MOSTLY_F16, 0.02),
    ("bf16", gguf.LlamaFileType.MOSTLY_BF16, 0.15),
    ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, 0.4),
])
def test_smaller_dtypes_load_and_stay_close(bpe_llama_dir, tmp_path, dtype, file_type, max_diff):
    tokens = Tokenizer(bpe_llama_dir).encode(TEXTS[0])
    export_merged(bpe_llama_dir, tmp_path / "f32.gguf", "f32")
    export_merged(bpe_llama_dir, tmp_path / "small.gguf", dtype)
    reader = gguf.GGUFReader(tmp_path / "small.gguf")
    assert reader.get_field("general.file_type").contents() == file_type
    diff = np.abs(llama_cpp_logits(tmp_path / "small.gguf", tokens)
                  - llama_cpp_logits(tmp_path / "f32.gguf", tokens)).max()
    print(f"{dtype}: max abs logit difference {diff:.1e}")
    assert diff < max_diff
