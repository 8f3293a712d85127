"""A checkpoint's tokenizer as GGUF metadata, in the form llama.cpp's BPE tokenizer reads.

llama.cpp re-implements tokenization in C++, so we only export what it reproduces exactly: a
byte-level BPE ("gpt2" in GGUF terms) with no normalizer, split before BPE by a pre-tokenizer
llama.cpp knows by name. Anything else is refused rather than exported to tokenize differently.
"""

import json
from pathlib import Path

import gguf

from loraplex.export.errors import ExportError
from loraplex.model.tokenizer import Tokenizer

# GGUF pre-tokenizer name -> the tokenizer.json pre-tokenizer steps llama.cpp's C++ code for that
# name splits text like. trim_offsets is left out of the comparison: it only changes offsets.
PRE_TOKENIZERS = {
    # SmolLM2: every digit on its own, then GPT-2's byte-level regex split.
    "smollm": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    ],
    "gpt-2": [{"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}],
}
SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")


def add_tokenizer(
    writer: gguf.GGUFWriter, model_dir: Path, tokenizer: Tokenizer, vocab_size: int
) -> None:
    """Write model_dir's vocabulary, merges, token types, special ids and chat template."""
    path = model_dir / "tokenizer.json"  # present: `tokenizer` was loaded from it
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise ExportError(
            f"{path}: only byte-level BPE tokenizers without a normalizer (GPT-2 style, as in "
            f"SmolLM2) can be exported to GGUF; this one is {model.get('type')!r}"
        )
    tokens, types = _vocabulary(path, model["vocab"], spec.get("added_tokens") or [], vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(path, spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # tokenizers writes merges as ["a", "b"] pairs (older files: "a b"); GGUF wants "a b".
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])

    ids = _special_ids(model_dir, {text: i for i, text in enumerate(tokens)})
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "pad": writer.add_pad_token_id, "unk": writer.add_unk_token_id}
    for kind, token_id in ids.items():
        adders[kind](token_id)
    # llama.cpp adds BOS to text prompts only when told to; match what our tokenizer does.
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    writer.add_add_bos_token(len(with_special) > len(plain) and with_special[0] == ids.get("bos"))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer_name(path: Path, pre_tokenizer: dict | None) -> str:
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer])
    steps = [{k: v for k, v in (step or {}).items() if k != "trim_offsets"} for step in steps]
    for name, expected in PRE_TOKENIZERS.items():
        if steps == expected:
            return name
    raise ExportError(
        f"{path}: pre-tokenizer {json.dumps(pre_tokenizer)} has no llama.cpp equivalent we "
        f"export (supported: {', '.join(PRE_TOKENIZERS)})"
    )


def _vocabulary(
    path: Path, vocab: dict[str, int], added_tokens: list[dict], vocab_size: int
) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF token types, one per embedding row (vocab_size of them)."""
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    entries = [(text, i, None) for text, i in vocab.items()]
    entries += [(t["content"], t["id"], t.get("special", False)) for t in added_tokens]
    for text, i, special in entries:
        if not 0 <= i < vocab_size:
            raise ExportError(
                f"{path}: token {text!r} has id {i}, but the model has {vocab_size} embeddings"
            )
        tokens[i] = text
        if special is not None:
            # Special added tokens (<|im_start|>...) are control tokens: matched whole, never
            # split, skipped when decoding; other added tokens are matched whole but printed.
            types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    for i, text in enumerate(tokens):
        if text is None:
            # Embedding rows beyond the tokenizer (vocab padded to a round size) still need a
            # token each; llama.cpp's own converter names them the same way.
            tokens[i] = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
    return tokens, types


def _special_ids(model_dir: Path, ids: dict[str, int]) -> dict[str, int]:
    """bos/eos/pad/unk ids: the tokens tokenizer_config.json names, as transformers reads them;
    config.json's *_token_id where it names none."""
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    config = _read_json(model_dir / "config.json")
    found = {}
    for kind in SPECIAL_TOKENS:
        text = tokenizer_config.get(f"{kind}_token")
        text = text.get("content") if isinstance(text, dict) else text
        fallback = config.get(f"{kind}_token_id")
        if text in ids:
            found[kind] = ids[text]
        elif isinstance(fallback, int):  # a list (several eos ids) has no single GGUF value
            found[kind] = fallback
    return found


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
