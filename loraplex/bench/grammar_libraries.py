"""llguidance against xgrammar on a model's tokenizer: the tokenizer table, compile time per JSON
schema and mask time per row, each schema walked token by token along a valid compact answer
(one thread, caches off). The record behind engine/guided.py's choice; xgrammar is not a
dependency of loraplex: `pip install xgrammar` first.

    python -m loraplex.bench.grammar_libraries [--model smollm2-135m] [--repeats 3]
"""

import argparse
import json
import statistics
import time

from loraplex.model.pull import resolve_model

SCHEMAS = [  # (schema, a valid answer)
    ({"type": "object", "properties": {"name": {"type": "string"},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 150}},
      "required": ["name", "age"]}, {"name": "Alice Smith", "age": 42}),
    ({"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
     {"items": [{"sku": "A-1", "qty": 2}, {"sku": "B-22", "qty": 10}]}),
    ({"type": "object", "properties": {"kind": {"enum": ["a", "b", "c"]},
                                       "v": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                                       "note": {"type": "string"}}, "required": ["kind"]},
     {"kind": "b", "v": 3.5, "note": "hello world"}),
    ({"type": "object", "properties": {"case": {"type": "string"},
                                       "parties": {"type": "array", "items": {"type": "string"}},
                                       "summary": {"type": "string", "maxLength": 200},
                                       "date": {"type": "string", "format": "date"}},
      "required": ["case", "parties", "summary"]},
     {"case": "Doe v. Roe", "parties": ["Doe", "Roe"], "summary": "A dispute over a contract.",
      "date": "2024-01-02"}),
]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    try:
        import xgrammar
    except ImportError:
        parser.error("this comparison needs xgrammar: pip install xgrammar")
    import llguidance
    import llguidance.torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer_json = (resolve_model(options.model) / "tokenizer.json").read_text()
    hf = Tokenizer.from_str(tokenizer_json)
    vocab = hf.get_vocab_size(with_added_tokens=True)
    start = time.perf_counter()
    ll_tokenizer = llguidance.LLTokenizer(tokenizer_json)
    setup = {"llguidance": time.perf_counter() - start}
    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(
        PreTrainedTokenizerFast(tokenizer_object=hf), vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    setup["xgrammar"] = time.perf_counter() - start

    for name in ("llguidance", "xgrammar"):
        compile_s, mask_s = [], []
        for _ in range(options.repeats):
            for schema, answer in SCHEMAS:
                text = json.dumps(answer, separators=(",", ":"))
                ids = hf.encode(text, add_special_tokens=False).ids
                start = time.perf_counter()
                if name == "llguidance":
                    matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.LLMatcher.
                                                   grammar_from_json_schema(
                                                       schema,
                                                       defaults={"whitespace_flexible": False}))
                    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
                else:
                    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(
                        json.dumps(schema), any_whitespace=False, separators=(",", ":")))
                    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
                compile_s.append(time.perf_counter() - start)
                for token in ids:
                    start = time.perf_counter()
                    if name == "llguidance":
                        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
                        mask_s.append(time.perf_counter() - start)
                        accepted = matcher.consume_token(token)
                    else:
                        matcher.fill_next_token_bitmask(bitmask, 0)
                        mask_s.append(time.perf_counter() - start)
                        accepted = matcher.accept_token(token)
                    if not accepted:
                        raise SystemExit(f"{name} refused a token of a valid answer: {text}")
        print(f"{name}: tokenizer table {setup[name] * 1e3:.0f} ms; compile p50 "
              f"{statistics.median(compile_s) * 1e3:.1f} ms, p99 "
              f"{_quantile(compile_s, 0.99) * 1e3:.1f} ms; mask p50 "
              f"{statistics.median(mask_s) * 1e6:.0f} us, p99 "
              f"{_quantile(mask_s, 0.99) * 1e6:.0f} us ({len(mask_s)} masks)")


if __name__ == "__main__":
    main()
