"""What the adapters' precision changes in answers: greedy generations with each adapter on the
float32 engine (the reference), on the bfloat16 engine with bf16 adapter weights, and on the
bfloat16 engine with int8 adapter weights (EngineConfig.lora_dtype="int8").

    python -m loraplex.bench.lora_precision ADAPTER_DIR [ADAPTER_DIR ...] [--model smollm2-135m]
        [--max-tokens 48]

Each adapter answers the same chat prompts (PROMPTS). For each bfloat16 variant, per answer: how
many tokens agree with float32's before the first difference, and the largest log-prob
difference over the tokens both share. If int8 weights cost accuracy beyond bfloat16's own, its
answers part from float32's sooner than bf16's do. Used for BENCHMARKS.md ("Int8 adapter
weights").
"""

import argparse
import statistics
from pathlib import Path

from loraplex.bench.cli import positive_int
from loraplex.config import ConfigError
from loraplex.llm import LLM
from loraplex.lora.adapter import AdapterError
from loraplex.model.pull import PullError
from loraplex.sampling_params import SamplingParams

PROMPTS = [
    "I have had a headache for three days. What should I do?",
    "Can my landlord keep my deposit for normal wear and tear?",
    "Do you ship to Canada, and how long does it take?",
    "What should I do this weekend?",
    "Explain what a contract is in two sentences.",
    "My order arrived damaged. What are my options?",
    "How much water should an adult drink a day?",
    "Write a short thank-you note to a customer.",
]
# name -> EngineConfig fields
VARIANTS = {
    "float32": {"dtype": "float32"},
    "bf16 weights": {"dtype": "bfloat16"},
    "int8 weights": {"dtype": "bfloat16", "lora_dtype": "int8"},
}


def agreement(answer, reference) -> tuple[int, float]:
    """(tokens equal before the first difference, largest |log-prob difference| over them)."""
    same = next((i for i, (a, b) in enumerate(zip(answer.token_ids, reference.token_ids,
                                                     strict=True)) if a != b),
                len(reference.token_ids))
    drift = max((abs(answer.logprobs[i] - reference.logprobs[i]) for i in range(same)),
                default=0.0)
    return same, drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+", type=Path, help="PEFT adapter directories")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=positive_int, default=48)
    args = parser.parse_args()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=0,
                            ignore_eos=True)
    answers = {}
    for name, config in VARIANTS.items():
        try:
            llm = LLM(args.model, max_loras=len(args.adapters), max_cpu_loras=len(args.adapters),
                      max_lora_rank=64, **config)
        except (ConfigError, PullError, OSError) as e:
            parser.error(str(e))
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}])
                   for p in PROMPTS]
        pairs = [(prompt, adapter) for adapter in args.adapters for prompt in prompts]
        try:
            outputs = llm.generate([p for p, _ in pairs], params, [a for _, a in pairs])
        except AdapterError as e:
            parser.error(str(e))
        failed = [out.error for out in outputs if out.error]
        if failed:
            parser.error(failed[0])
        answers[name] = outputs
    reference = answers.pop("float32")
    print(f"{len(args.adapters)} adapters x {len(PROMPTS)} prompts, {args.max_tokens} greedy "
          "tokens; against the float32 engine:")
    for name, outputs in answers.items():
        results = [agreement(a, r) for a, r in zip(outputs, reference, strict=True)]
        same = [s for s, _ in results]
        print(f"{name:>13}: all {args.max_tokens} tokens equal in {same.count(args.max_tokens)} "
              f"of {len(same)} answers; tokens before the first difference median "
              f"{statistics.median(same):.0f}, min {min(same)}; largest log-prob difference "
              f"over shared tokens median {statistics.median(d for _, d in results):.3f}, "
              f"max {max(d for _, d in results):.3f}")


if __name__ == "__main__":
    main()
