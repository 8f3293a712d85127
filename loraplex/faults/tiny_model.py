"""A tiny random llama for runs that need a real model but not a real answer: the fault runs
(and the test suite's fixtures) build it in seconds, offline.

Hidden 64, 2 layers, GQA, a byte-level BPE tokenizer trained in milliseconds (so a GGUF export
and llama.cpp can read it) and large weights, so that greedy choices have clear margins: an
answer is then a fingerprint of the adapter version that gave it.
"""

import json
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ("The clinic opens at nine. Your order ships today. The contract is void. "
          "Hello, how can I help you? Count 1 2 3 10 42.\n") * 20


def save_bpe_tokenizer(path: Path, corpus: str = CORPUS) -> int:
    """A GPT-2 style byte-level BPE trained on `corpus`, saved with a ChatML template; returns
    its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
    }))
    return tok.get_vocab_size()


def write_tiny_model(path: Path) -> Path:
    """The tiny random llama (config.json, model.safetensors, the tokenizer) at `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = save_bpe_tokenizer(path)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, initializer_range=0.15,
        max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return path
