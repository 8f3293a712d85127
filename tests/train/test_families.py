"""`loraplex train` on the families whose PEFT module names differ from ours (Phi-3's fused
modules; Gemma 3's multimodal wrapper, whose vision tower has q_proj too): the adapter validates,
serves, and generates what PEFT generates with it."""

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.model.loader import ModelLoadError
from loraplex.vault.artifacts import ArtifactSealer, materialized
from tests.conftest import save_tiny_tokenizer
from tests.model.test_families import SHAPE, _config
from tests.test_llm import _peft_greedy
from tests.train.test_trainer import train


@pytest.fixture(scope="module", params=["phi3", "gemma3-multimodal"])
def model_dir(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(_config(request.param)).save_pretrained(path)
    save_tiny_tokenizer(path, SHAPE["vocab_size"])
    return path


def test_trained_adapter_serves_as_in_peft(home, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    version = train(home, model_dir)  # all seven modules; validated on push
    assert version.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj")
    prompt = [5, 17, 33, 8]
    llm = LLM(str(model_dir), max_loras=1, max_lora_rank=4, kv_cache_bytes=1 << 22)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0, ignore_eos=True)
    reader = ArtifactSealer.for_home(home).reader("acme", version.artifact_path)
    with materialized(reader) as adapter_dir:  # a PEFT dir, as LLM and PEFT read them
        out = llm.generate([prompt], params, adapters=[adapter_dir])[0]
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        peft = PeftModel.from_pretrained(base, adapter_dir).eval()
    want_tokens, want_logprobs = _peft_greedy(peft, prompt, 8)
    assert out.token_ids == want_tokens
    assert max(abs(a - b) for a, b in zip(out.logprobs, want_logprobs, strict=True)) < 1e-4
    with peft.disable_adapter():  # training moved the adapter away from a no-op
        _, base_logprobs = _peft_greedy(peft, prompt, 8)
    assert max(abs(a - b) for a, b in zip(base_logprobs, want_logprobs, strict=True)) > 1e-3


@pytest.mark.parametrize("model_dir", ["phi3"], indirect=True)
def test_phi3_needs_whole_fused_groups(home, model_dir):
    with pytest.raises(ModelLoadError, match="fuse q_proj, k_proj, v_proj into qkv_proj"):
        train(home, model_dir, targets=["q_proj", "v_proj"])
