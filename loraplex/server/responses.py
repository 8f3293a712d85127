"""Pieces of OpenAI's response shapes that chat and completions share."""

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loraplex.engine.async_engine import StreamDelta
from loraplex.server.protocol import OpenAIError


@dataclass
class Answer:
    """What every response of one request shares."""

    response_id: str
    model: str  # the name the client asked for
    tokenizer: object  # for the logprobs' token strings
    n: int  # completions
    usage_chunks: str  # streamed usage: "none", "last" (a last chunk) or "every" (each chunk)
    with_logprobs: bool


def error_of(delta: StreamDelta) -> OpenAIError:
    """The engine's typed error kind decides the status: the request's own fault is a 400."""
    return OpenAIError(400 if delta.error_kind == "request" else 500, delta.error,
                       "invalid_request_error" if delta.error_kind == "request"
                       else "server_error")


def finish_reason(delta: StreamDelta) -> str | None:
    if not delta.finished:
        return None
    return {"stop": "stop", "length": "length"}.get(delta.finish_reason, delta.finish_reason)


def usage_chunks(stream_options) -> str:
    """Which streamed chunks carry usage, as the request's stream_options ask."""
    if stream_options is None or not stream_options.include_usage:
        return "none"
    return "every" if stream_options.continuous_usage_stats else "last"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def total_usage(merged: list[StreamDelta]) -> dict:
    """A whole answer's usage: the prompt once, every completion's tokens."""
    return usage(merged[0].prompt_tokens, sum(m.completion_tokens for m in merged))


def merge(parts: list[StreamDelta]) -> StreamDelta:
    """One completion's deltas as one."""
    last = parts[-1]
    return StreamDelta(
        request_id=last.request_id, index=last.index, text="".join(p.text for p in parts),
        token_ids=[t for p in parts for t in p.token_ids],
        logprobs=[x for p in parts for x in p.logprobs],
        top_logprobs=[x for p in parts for x in p.top_logprobs], finished=True,
        finish_reason=last.finish_reason, error=last.error, error_kind=last.error_kind,
        prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
        queue_seconds=last.queue_seconds)


def by_completion(deltas: list[StreamDelta], n: int) -> list[StreamDelta]:
    """A whole answer's deltas, merged per completion (index 0..n-1); raises its error."""
    parts: dict[int, list[StreamDelta]] = {}
    for d in deltas:
        parts.setdefault(d.index, []).append(d)
    merged = [merge(parts[i]) for i in range(n)]
    failed = next((m for m in merged if m.error), None)
    if failed is not None:
        raise error_of(failed)
    return merged


def logprobs_chat(delta: StreamDelta, tokenizer) -> dict:
    content = []
    for token, logprob, top in zip(delta.token_ids, delta.logprobs, delta.top_logprobs,
                                   strict=True):
        alternatives = [{"token": tokenizer.decode([t], skip_special_tokens=False),
                         "logprob": lp} for t, lp in top.items()]
        content.append({"token": tokenizer.decode([token], skip_special_tokens=False),
                        "logprob": logprob, "top_logprobs": alternatives})
    return {"content": content}


def logprobs_completion(delta: StreamDelta, tokenizer) -> dict:
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in delta.token_ids]
    return {
        "tokens": tokens,
        "token_logprobs": delta.logprobs,
        "top_logprobs": [{tokenizer.decode([t], skip_special_tokens=False): lp
                          for t, lp in top.items()} for top in delta.top_logprobs],
    }


async def stream_chunks(deltas: AsyncIterator[StreamDelta],
                        chunk: Callable[[StreamDelta], dict | None],
                        usage_chunk: Callable[[dict], dict], usage_chunks: str
                        ) -> AsyncIterator[dict]:
    """A streamed answer: `chunk(delta)` per delta (None: nothing to send for it), an error as
    the last event, and `usage_chunk(usage)` at the end when the client asked for usage
    (`usage_chunks` "last" or "every"; "every" also puts the usage so far in each chunk)."""
    prompt_tokens, completion_tokens = 0, {}
    async for delta in deltas:
        if delta.error:
            yield error_of(delta).body()
            return
        prompt_tokens = delta.prompt_tokens
        completion_tokens[delta.index] = delta.completion_tokens
        body = chunk(delta)
        if body is not None:
            if usage_chunks == "every":
                body["usage"] = usage(prompt_tokens, sum(completion_tokens.values()))
            yield body
    if usage_chunks != "none":
        yield usage_chunk(usage(prompt_tokens, sum(completion_tokens.values())))
