"""Does the HTTP path slow the engine? GuideLLM against `loraplex serve`, then the same engine
in-process, on the same shape, alternating.

HTTP: `loraplex serve` in its own process; GuideLLM (`pip install guidellm`, its own process
and ideally its own venv: `--guidellm PATH`) sends streaming chat completions of synthetic
prompts (`--prompt-tokens`, default 128) asking for `--output-tokens` (64, ignore_eos) with
N concurrent streams (`--concurrency 1,8,32`), `--requests` of them in all per level. With
`--client light` a small asyncio client (httpx, in a process of its own) sends instead the very
prompts the in-process path gets: on 2 cores the load generator's own CPU counts against the
server, and GuideLLM's is not small. In-process:
an AsyncEngine in this process (the server stopped) gets the same requests (synthetic text of
the same length through the same chat template, the same adapter, temperature 1 as GuideLLM's
requests leave it) from the same number of concurrent tasks, in a fresh process each round.
Reported per level: output tokens per second (all output tokens from the first request sent to
the last one finished) and TTFT p50, each path's median over `--rounds`, and HTTP / in-process.

    python -m loraplex.bench.http_path [--client guidellm|light] [--guidellm guidellm]
        [--concurrency 1,8,32] [--requests 8,32,64] [--rounds 2] [--model smollm2-135m]
        [--dtype float32] [--llama-cpp]

With `--llama-cpp`, each round also runs llama.cpp (bench/peers.py LlamaCppSystem: the base and
the same adapter through our GGUF exporter, at the same precision, in a fresh process) on the
1-client level's prompts, one at a time, the in-process path's token ids: the issue's "one
client over HTTP against llama.cpp", side by side.

Threads: the server and the in-process engine both run torch's default (one OpenMP thread per
core); GuideLLM's process and this one mostly wait on sockets.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from loraplex.bench.fairness import (
    check_return_window,
    free_port,
    setup_tenants,
    start_server,
    stop_server,
)
from loraplex.config import EngineConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.home import HOME_ENV
from loraplex.model.pull import resolve_model
from loraplex.model.tokenizer import Tokenizer
from loraplex.registry import Registry
from loraplex.sampling_params import SamplingParams
from loraplex.server.serving import adapter_request
from loraplex.vault.artifacts import ArtifactSealer

TENANT, ADAPTER = "t0", "bot"


def _guidellm(guidellm: str, url: str, key: str, model_dir: Path, streams: int,
              num_requests: int, prompt_tokens: int, output_tokens: int, out: Path,
              seed: int) -> dict:
    """One GuideLLM level: its output tokens/s and TTFT p50 (s). Its synthetic prompts come from
    `seed` (GuideLLM's default is the same for every run: a level would repeat the prompts of
    the last one, found in the prefix cache)."""
    command = [
        guidellm, "run", "--backend", f"kind=openai_http,target={url},model={ADAPTER},"
        f"api_key={key}", "--profile", f"kind=concurrent,streams={streams}",
        "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},"
        f"output_tokens={output_tokens}", "--tokenizer", f"kind=hf_auto,model={model_dir}",
        "--constraint", f"kind=max_requests,count={num_requests}",
        "--seed", f"kind=static,value={seed}",
        "--output", f"kind=json,path={out}", "--disable-console"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    benchmark = json.loads(out.read_text())["benchmarks"][0]
    requests, metrics = benchmark["requests"], benchmark["metrics"]
    if requests["errored"]:
        raise RuntimeError(f"GuideLLM: {len(requests['errored'])} requests failed")
    # Over the requests' own span (first sent to last finished), as the in-process figure is:
    # GuideLLM's benchmark duration also counts its own start-up.
    done = requests["successful"]
    span = max(r["request_end_time"] for r in done) - min(r["request_start_time"] for r in done)
    ttft = metrics["time_to_first_token_ms"]["successful"]["percentiles"]["p50"] / 1000
    output_tokens = sum(r["output_tokens"] for r in done)
    return {"output_tok_s": output_tokens / span, "ttft_p50": ttft,
            "output_tokens": output_tokens}


def _texts(tokenizer, count: int, prompt_tokens: int, seed: str) -> list[str]:
    """User messages of `prompt_tokens` tokens of random words, as GuideLLM's synthetic data.
    Each level of a round has its own `seed` (_seed): a level repeating the last one's prompts
    would find them in the prefix cache."""
    rng = random.Random(seed)
    # Words from the middle of the vocabulary (past the bytes and merges of the first 1,000;
    # a small test vocabulary's first tokens do).
    first = 1000 if tokenizer.vocab_size > 6000 else 0
    words = [w for w in (tokenizer.decode([t]).strip()
                         for t in range(first, min(6000, tokenizer.vocab_size))) if w.isalpha()]
    texts = []
    for _ in range(count):
        ids = tokenizer.encode(" ".join(rng.choice(words) for _ in range(prompt_tokens * 2)),
                               add_special_tokens=False)[:prompt_tokens]
        texts.append(tokenizer.decode(ids))
    return texts


def _seed(round_: int, streams: int) -> str:
    """The prompts' seed of one level of one round (0 streams: the warm-up), the same on every
    path."""
    return f"{round_}-{streams}"


def _prompts(tokenizer, count: int, prompt_tokens: int, seed: str) -> list[list[int]]:
    """The _texts through the model's chat template, as the server applies it."""
    return [tokenizer.encode_chat([{"role": "user", "content": text}])
            for text in _texts(tokenizer, count, prompt_tokens, seed)]


async def _light(url: str, key: str, texts: list[str], streams: int, output_tokens: int) -> dict:
    """`texts` as streaming chat completions from `streams` concurrent tasks (each sends its
    next one when its last finished, as GuideLLM's concurrent profile); output tokens/s over
    the requests' span and TTFT p50 (s), the first token being the first chunk with content."""
    body = {"model": ADAPTER, "max_tokens": output_tokens, "temperature": 1.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    pending, ttfts, tokens = list(texts), [], 0

    async def client(http: httpx.AsyncClient):
        nonlocal tokens
        while pending:
            text, start, first = pending.pop(), time.perf_counter(), None
            async with http.stream("POST", "/v1/chat/completions", headers={
                    "Authorization": f"Bearer {key}"}, json=body | {"messages": [
                        {"role": "user", "content": text}]}) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and any(c["delta"].get("content")
                                             for c in chunk["choices"]):
                        first = time.perf_counter() - start
                    if chunk.get("usage") and not chunk["choices"]:
                        tokens += chunk["usage"]["completion_tokens"]
            # A reply whose tokens all decode to no text (a tiny test model's can): its end
            # stands for its first token.
            ttfts.append(first if first is not None else time.perf_counter() - start)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=streams)) as http:
        await asyncio.gather(*(client(http) for _ in range(streams)))
    return {"output_tok_s": tokens / (time.perf_counter() - start),
            "ttft_p50": statistics.median(ttfts), "output_tokens": tokens}


def _light_in_own_process(url: str, key: str, texts: list[str], streams: int,
                          output_tokens: int) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_light_sync, (url, key, texts, streams, output_tokens))


def _light_sync(*args) -> dict:
    return asyncio.run(_light(*args))


async def _in_process(engine: AsyncEngine, adapter, prompts: list[list[int]],
                      streams: int, output_tokens: int, reaction_s: float) -> dict:
    """The same requests from `streams` concurrent tasks, each sending its next request
    `reaction_s` after its last one ended (0: at once, which no client over a network can);
    output tokens/s and TTFT p50 (s), TTFT from the request's sending."""
    params = SamplingParams(max_tokens=output_tokens, temperature=1.0, ignore_eos=True)
    pending, ttfts, tokens = list(prompts), [], 0

    async def client():
        nonlocal tokens
        while pending:
            prompt, start, first = pending.pop(), time.perf_counter(), None
            async for delta in engine.generate(prompt, params, adapter, fairness_key=TENANT):
                if delta.error:
                    raise RuntimeError(f"in-process request failed: {delta.error}")
                if first is None and delta.token_ids:
                    first = time.perf_counter() - start
                tokens += len(delta.token_ids)
            ttfts.append(first)
            if reaction_s and pending:
                await asyncio.sleep(reaction_s)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(streams)))
    return {"output_tok_s": tokens / (time.perf_counter() - start),
            "ttft_p50": statistics.median(ttfts), "output_tokens": tokens}


def _http_round(options, env: dict, key: str, model_dir: Path, levels, tmp: Path,
                seed: int) -> dict:
    port = free_port()
    server = start_server(options.model, port, env, "fair", options.dtype, 64, 512,
                          "--return-window-ms", str(options.return_window_ms))
    try:
        url = f"http://127.0.0.1:{port}"
        if options.client == "light":
            tokenizer = Tokenizer(model_dir)
            texts = {streams: _texts(tokenizer, count, options.prompt_tokens,
                                     _seed(seed, streams)) for streams, count in levels}
            warm_up = _texts(tokenizer, 1, options.prompt_tokens, _seed(seed, 0))
            _light_in_own_process(url, key, warm_up, 1, 4)
            return {streams: _light_in_own_process(url, key, texts[streams], streams,
                                                   options.output_tokens)
                    for streams, _ in levels}
        # Seeds as _seed's: one per level of the round, 0 streams for the warm-up.
        _guidellm(options.guidellm, url, key, model_dir, 1, 1, options.prompt_tokens, 4,
                  tmp / "warmup.json", 1000 * seed)
        return {streams: _guidellm(options.guidellm, url, key, model_dir, streams, count,
                                   options.prompt_tokens, options.output_tokens,
                                   tmp / f"c{streams}.json", 1000 * seed + streams)
                for streams, count in levels}
    finally:
        stop_server(server)


def _in_process_round(options, home: Path, levels, seed: int) -> dict:
    with Registry(home) as registry:
        found = registry.resolve(registry.get_tenant(TENANT).id, ADAPTER, "bench")
    # What the server hands its engine: the sealed artifact, decrypted in memory on a miss.
    adapter = adapter_request(ArtifactSealer.for_home(home), TENANT, found.version_id,
                              found.artifact_path)
    engine = AsyncEngine(EngineConfig(model=options.model, dtype=options.dtype,
                                      return_window_ms=options.return_window_ms))
    try:
        prompts = {streams: _prompts(engine.tokenizer, count, options.prompt_tokens,
                                     _seed(seed, streams)) for streams, count in levels}
        warm_up = _prompts(engine.tokenizer, 1, options.prompt_tokens, _seed(seed, 0))
        asyncio.run(_in_process(engine, adapter, warm_up, 1, 4, 0.0))
        return {streams: asyncio.run(_in_process(engine, adapter, prompts[streams], streams,
                                                 options.output_tokens,
                                                 options.reaction_ms / 1e3))
                for streams, _ in levels}
    finally:
        engine.shutdown()


def _llama_cpp_round(options, home: Path, levels, seed: int) -> dict:
    """llama.cpp on the 1-client level's prompts (their chat-templated token ids), one at a time,
    with the tenant's adapter; the same figures as the other paths."""
    from loraplex.bench.peers import LlamaCppSystem
    from loraplex.bench.workload import BenchRequest

    model_dir = resolve_model(options.model)
    prompts = _prompts(Tokenizer(model_dir), dict(levels)[1], options.prompt_tokens,
                       _seed(seed, 1))
    system = LlamaCppSystem()
    system.setup(model_dir, [home / "src" / TENANT], dtype=options.dtype)
    try:
        requests = [BenchRequest(i, 0.0, 0, tuple(p), options.output_tokens)
                    for i, p in enumerate(prompts)]
        start = time.perf_counter()
        records = system.run(requests)
        elapsed = time.perf_counter() - start
    finally:
        system.close()
    if errors := [r.error for r in records if r.error]:
        raise RuntimeError(f"llama.cpp failed: {errors[0]}")
    return {1: {"output_tok_s": sum(r.output_tokens for r in records) / elapsed,
                # from each request's own start: one client sends the next when one ends
                "ttft_p50": statistics.median(r.token_times_s[0] - r.start_s for r in records),
                "output_tokens": sum(r.output_tokens for r in records)}}


def _in_fresh_process(round_function, options, home: Path, levels, seed: int) -> dict:
    """An in-process round in a process of its own: a second engine thread in one process gets
    a second OpenMP thread team, and both then run several times slower
    (engine/adapter_manager.py says how much), so each round's engine is its process's first;
    llama.cpp brings an OpenMP runtime of its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(round_function, (options, home, levels, seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", choices=("guidellm", "light"), default="guidellm",
                        help="the HTTP load generator: GuideLLM, or a small client of ours")
    parser.add_argument("--guidellm", default="guidellm", help="GuideLLM's executable")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", default="8,32,64", help="per concurrency level")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reaction-ms", type=float, default=0.0,
                        help="in-process clients send their next request this long after the "
                        "last one ended (as a client over a network must), default 0")
    parser.add_argument("--return-window-ms", type=float, default=EngineConfig.return_window_ms,
                        help="the engine's return window in both paths (engine/return_window.py)"
                        ", default %(default)s")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also llama.cpp on the 1-client level (needs llama-cpp-python)")
    options = parser.parse_args()
    levels = list(zip([int(c) for c in options.concurrency.split(",")],
                      [int(n) for n in options.requests.split(",")], strict=True))
    if options.llama_cpp and 1 not in dict(levels):
        parser.error("--llama-cpp compares the 1-client level: include 1 in --concurrency")
    if not options.reaction_ms >= 0:
        parser.error(f"--reaction-ms must be 0 or more, got {options.reaction_ms}")
    check_return_window(parser, options.return_window_ms)
    with tempfile.TemporaryDirectory(prefix="loraplex-http-") as tmp:
        home = Path(tmp)
        keys, _ = setup_tenants(home, options.model, [TENANT])
        env = {**os.environ, HOME_ENV: str(home), "LORAPLEX_ADAPTER_CACHE": str(home / "cache"),
               "LORAPLEX_KERNEL_CACHE": os.environ.get("LORAPLEX_KERNEL_CACHE") or str(
                   Path.home() / ".loraplex" / "cache" / "kernels")}
        os.environ.update({k: env[k] for k in ("LORAPLEX_ADAPTER_CACHE",
                                               "LORAPLEX_KERNEL_CACHE")})
        model_dir = resolve_model(options.model)
        runs = {"http": [], "in-process": [], **({"llama.cpp": []} if options.llama_cpp else {})}
        for round_ in range(options.rounds):
            order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
            for path in order:
                if path == "http":
                    result = _http_round(options, env, keys[TENANT], model_dir, levels, home,
                                         round_)
                else:
                    result = _in_fresh_process(
                        _in_process_round if path == "in-process" else _llama_cpp_round,
                        options, home, levels, round_)
                runs[path].append(result)
                print(json.dumps({"round": round_, "path": path, **{
                    str(c): r for c, r in result.items()}}), flush=True)
    _report(levels, runs)


def _report(levels, runs: dict[str, list[dict]]) -> None:
    """Each path's medians over the rounds per level, and the ratios the issue's targets name."""
    print(f"\n{'clients':>7} {'HTTP tok/s':>10} {'in-proc tok/s':>13} {'ratio':>6} "
          f"{'HTTP TTFT p50':>13} {'in-proc TTFT p50':>16} {'ratio':>6}")
    for streams, _ in levels:
        http = {k: statistics.median(r[streams][k] for r in runs["http"])
                for k in ("output_tok_s", "ttft_p50")}
        local = {k: statistics.median(r[streams][k] for r in runs["in-process"])
                 for k in ("output_tok_s", "ttft_p50")}
        print(f"{streams:>7} {http['output_tok_s']:10.1f} {local['output_tok_s']:13.1f} "
              f"{http['output_tok_s'] / local['output_tok_s']:6.2f} "
              f"{http['ttft_p50']:11.2f} s {local['ttft_p50']:14.2f} s "
              f"{http['ttft_p50'] / local['ttft_p50']:6.2f}")
    if "llama.cpp" in runs:
        peer = statistics.median(r[1]["output_tok_s"] for r in runs["llama.cpp"])
        http = statistics.median(r[1]["output_tok_s"] for r in runs["http"])
        local = statistics.median(r[1]["output_tok_s"] for r in runs["in-process"])
        by_round = ", ".join(f"{h[1]['output_tok_s'] / p[1]['output_tok_s']:.2f}"
                             for h, p in zip(runs["http"], runs["llama.cpp"], strict=True))
        print(f"\n1 client: llama.cpp {peer:.1f} tok/s; HTTP / llama.cpp {http / peer:.2f} "
              f"(by round {by_round}); in-process / llama.cpp {local / peer:.2f}")


if __name__ == "__main__":
    main()
