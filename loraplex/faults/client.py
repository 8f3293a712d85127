"""One greedy request to a fault run's server, read as the run needs it: the status, the
version header, the generated tokens (from the logprobs, streamed or not) and whether the
answer arrived whole. A client that hangs up mid-stream is one of the faults."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx

from loraplex.server.serving import VERSION_HEADER

ENDPOINTS = ("completions", "chat")


@dataclass
class Answer:
    status: int
    version: str | None  # the x-loraplex-adapter-version header
    tokens: list[str]  # the generated tokens' strings, in order
    is_whole: bool  # the answer finished and came back complete (finish_reason seen)
    error: str | None = None


def body(endpoint: str, model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    """A greedy request that generates exactly max_tokens (ignore_eos), with logprobs, whose
    token strings are what the run compares."""
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
              "stream": stream}
    if endpoint == "chat":
        return {**common, "messages": [{"role": "user", "content": prompt}], "logprobs": True}
    return {**common, "prompt": prompt, "logprobs": 0}


def _tokens(endpoint: str, choice: dict) -> list[str]:
    logprobs = choice.get("logprobs") or {}
    if endpoint == "chat":
        return [entry["token"] for entry in logprobs.get("content") or []]
    return list(logprobs.get("tokens") or [])


async def ask(client: httpx.AsyncClient, url: str, key: str, endpoint: str, model: str,
              prompt: str, max_tokens: int, stream: bool,
              hang_up_after: int | None = None) -> Answer:
    """Send one request; with `hang_up_after`, close the stream after that many chunks."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    headers = {"Authorization": f"Bearer {key}"}
    request = body(endpoint, model, prompt, max_tokens, stream)
    if not stream:
        response = await client.post(url + path, json=request, headers=headers)
        if response.status_code != 200:
            return Answer(response.status_code, None, [], False, response.text[:300])
        choice = response.json()["choices"][0]
        return Answer(200, response.headers.get(VERSION_HEADER), _tokens(endpoint, choice),
                      choice.get("finish_reason") is not None)
    async with client.stream("POST", url + path, json=request, headers=headers) as response:
        version = response.headers.get(VERSION_HEADER)
        if response.status_code != 200:
            return Answer(response.status_code, version, [], False,
                          (await response.aread()).decode()[:300])
        tokens, finished, num_chunks = [], False, 0
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return Answer(200, version, tokens, False, chunk["error"].get("message"))
            for choice in chunk.get("choices") or []:
                tokens += _tokens(endpoint, choice)
                finished = finished or choice.get("finish_reason") is not None
            num_chunks += 1
            if hang_up_after is not None and num_chunks >= hang_up_after:
                break  # leaving the block closes the connection mid-answer
        return Answer(200, version, tokens, finished)
