"""What structured outputs cost: 32 concurrent requests, each with its own JSON schema, against
the same requests unconstrained (in-process engine, one batch).

The unconstrained twin of each request generates exactly as many tokens as the constrained one
did (max_tokens = its length, ignore_eos), so the two runs do the same model work and their
throughput ratio is the grammar's cost: compiling (a fresh cache each round) plus the per-step
masks. Rounds alternate constrained, unconstrained. Also reported: compile time per schema
(p50/p99, a cold compiler).

    python -m loraplex.bench.structured [--model smollm2-135m] [--requests 32] [--rounds 3]
        [--dtype float32]
"""

import argparse
import json
import statistics
import time

from loraplex import LLM, GrammarSpec, SamplingParams
from loraplex.engine.guided import GrammarCompiler

FIELD_TYPES = [
    {"type": "string", "maxLength": 24},
    {"type": "integer", "minimum": 0, "maximum": 10000},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "boolean"},
    {"enum": ["low", "medium", "high"]},
    {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                      "zip": {"type": "integer"}},
     "required": ["city", "zip"], "additionalProperties": False},
    {"anyOf": [{"type": "integer"}, {"type": "null"}]},
]
NAMES = ["name", "age", "score", "active", "priority", "tags", "address", "ref", "title",
         "count", "ratio", "valid", "level", "labels", "office", "parent"]
PROMPT = "Describe a customer record as JSON."


def schema(i: int) -> dict:
    """The i-th of many different schemas: 3-6 fields of varied types and names."""
    fields = {NAMES[(i + 3 * k) % len(NAMES)] + (str(i) if k == 0 else ""):
              FIELD_TYPES[(i + k) % len(FIELD_TYPES)] for k in range(3 + i % 4)}
    return {"type": "object", "properties": fields, "required": list(fields),
            "additionalProperties": False}


def _run(llm: LLM, prompts, params) -> tuple[float, list]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, outs


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=160)
    options = parser.parse_args()
    llm = LLM(options.model, dtype=options.dtype, max_num_seqs=options.requests)
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    specs = [GrammarSpec("json_schema", json.dumps(schema(i))) for i in range(options.requests)]

    compile_s = []
    for spec in specs:  # a cold compiler per schema: what a new schema costs
        compiler = GrammarCompiler(llm.tokenizer, llm.engine.model.config.vocab_size)
        compiler.tokenizer()  # its table is built once per server, not per schema
        start = time.perf_counter()
        compiler.compile(spec)
        compile_s.append(time.perf_counter() - start)

    rows = []
    for round_ in range(options.rounds):
        llm.engine.grammars = GrammarCompiler(llm.tokenizer, llm.engine.model.config.vocab_size)
        llm.engine.grammars.tokenizer()
        constrained = [SamplingParams(temperature=0, max_tokens=options.max_tokens, grammar=s)
                       for s in specs]
        seconds_c, outs = _run(llm, [prompt] * len(specs), constrained)
        valid = sum(o.finish_reason == "stop" for o in outs)
        lengths = [len(o.token_ids) for o in outs]
        free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        seconds_f, _ = _run(llm, [prompt] * len(specs), free)
        tokens = sum(lengths)
        row = {"round": round_, "tokens": tokens, "complete_json": valid,
               "constrained_tok_s": tokens / seconds_c, "free_tok_s": tokens / seconds_f,
               "ratio": seconds_f / seconds_c}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ms = [s * 1e3 for s in compile_s]
    print(f"\ncompile per schema (cold, {len(ms)} schemas): p50 {_percentile(ms, 0.5):.1f} ms, "
          f"p99 {_percentile(ms, 0.99):.1f} ms")
    print(f"throughput constrained / unconstrained, median of {len(rows)} rounds: "
          f"{statistics.median(r['ratio'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
