"""Prefix caching on a chat's second turn: its time to first token against the first turn's.

    python -m loraplex.bench.prefix_cache [--model smollm2-135m] [--history 1000]
        [--answer 64] [--message 24] [--rounds 5] [--dtype float32] [--threads N]

One process, two engines (prefix cache on, off), taking turns round by round. Each round is a
new conversation (its own opening, so no round finds another's blocks): the first turn sends a
history of `--history` tokens and generates `--answer` tokens; the second turn sends the
first's prompt + answer + a new message of `--message` tokens, as a chat client does. The
token ids are sent as they are: a server re-renders the history through the chat template,
which gives the same tokens but for the few where the answer meets the template's end-of-turn.
Prints the median TTFT of each turn, the second turn's over the first's, and that ratio
against the target (<= 0.3 with the cache on). In-process: the engine alone, no HTTP. On a
busy machine, --threads 1 keeps torch's threads from waiting on each other: a short step (the
second turn's) suffers from that far more than a long one.
"""

import argparse
import statistics
import time

import torch

from loraplex.config import DTYPES, EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.model.loader import read_config
from loraplex.model.pull import resolve_model
from loraplex.sampling_params import SamplingParams

TARGET = 0.3  # second turn's TTFT over the first's, at a 1,000-token history (issue 19)
PASSAGE = (
    "The lighthouse keeper wrote in the log every evening: the wind, the colour of the sea, "
    "the ships that passed and the ones that did not come. Over the years the entries grew "
    "shorter, but he never missed a night, and the log filled shelf after shelf. "
)
MESSAGE = "Thanks. Now tell me, in two sentences, what the keeper's log says about his life?"


def ttft(engine: LLMEngine, request_id: str, prompt: list[int], max_tokens: int) \
        -> tuple[float, list[int]]:
    """Seconds from adding the request to its first token, and the tokens it generated."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    first, tokens = None, []
    while engine.has_unfinished():
        for out in engine.step():
            if first is None and out.token_ids:
                first = time.perf_counter() - start
            tokens = out.token_ids
    return first, tokens


def conversation(engine: LLMEngine, round_: int, history: int, answer: int,
                 message: int) -> tuple[float, float]:
    """(first turn's TTFT, second turn's TTFT) of a new conversation."""
    encode = engine.tokenizer.encode
    opening = encode(f"Conversation {round_}. ")
    passage = encode(PASSAGE)
    body = (passage * (history // len(passage) + 1))[:history - len(opening)]
    first_prompt = opening + body
    first, answer_ids = ttft(engine, f"{round_}-1", first_prompt, answer)
    sentence = encode(MESSAGE)
    new_message = (sentence * (message // len(sentence) + 1))[:message]
    second, _ = ttft(engine, f"{round_}-2", first_prompt + answer_ids + new_message, 1)
    return first, second


def run(model: str, history: int, answer: int, message: int, rounds: int, dtype: str) -> dict:
    """Per setting ("on", "off"): the median TTFT of each turn, in seconds."""
    model_dir = resolve_model(model)
    max_len = history + answer + message + 1
    engines = {
        name: LLMEngine(EngineConfig(model=str(model_dir), dtype=dtype, max_model_len=max_len,
                                     kv_cache_bytes=_kv_bytes(model_dir, dtype, 4 * max_len),
                                     enable_prefix_caching=name == "on"))
        for name in ("on", "off")
    }
    times = {name: ([], []) for name in engines}
    for round_ in range(-1, rounds):  # round -1 warms both engines up, untimed
        for name, engine in engines.items():
            first, second = conversation(engine, round_, history, answer, message)
            if round_ >= 0:
                times[name][0].append(first)
                times[name][1].append(second)
    for engine in engines.values():
        engine.shutdown()
    return {name: {"first": statistics.median(a), "second": statistics.median(b)}
            for name, (a, b) in times.items()}


def _kv_bytes(model_dir, dtype: str, tokens: int) -> int:
    """A KV cache of `tokens` tokens (two engines share the machine's memory)."""
    mc = read_config(model_dir)
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * DTYPES[dtype].itemsize * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--history", type=int, default=1000, help="first turn's prompt tokens")
    parser.add_argument("--answer", type=int, default=64, help="first turn's answer tokens")
    parser.add_argument("--message", type=int, default=24, help="the new message's tokens")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    options = parser.parse_args()
    if min(options.answer, options.message, options.rounds, options.threads) < 1 \
            or options.history < 16:
        parser.error("--history must be at least 16; the other counts at least 1")
    torch.set_num_threads(options.threads)
    result = run(options.model, options.history, options.answer, options.message,
                 options.rounds, options.dtype)
    print(f"history {options.history} tokens, answer {options.answer}, new message "
          f"{options.message}, {options.dtype}, {options.threads} threads, median of "
          f"{options.rounds} rounds")
    print(f"{'prefix cache':>12}  {'turn 1 TTFT ms':>14}  {'turn 2 TTFT ms':>14}  turn 2 / turn 1")
    for name, r in result.items():
        print(f"{name:>12}  {1e3 * r['first']:>14.1f}  {1e3 * r['second']:>14.1f}  "
              f"{r['second'] / r['first']:.3f}")
    ratio = result["on"]["second"] / result["on"]["first"]
    print(f"target: turn 2 <= {TARGET}x turn 1 with the cache on: {ratio:.3f}x, "
          f"{'met' if ratio <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
