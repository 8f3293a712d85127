"""POST /v1/completions: a prompt (text or token ids) in, text out."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from loraplex.engine.async_engine import StreamDelta
from loraplex.model.tokenizer import TokenizerError
from loraplex.registry.tenants import Principal
from loraplex.server.protocol import CompletionRequest, OpenAIError, new_id, now
from loraplex.server.responses import (
    Answer,
    by_completion,
    finish_reason,
    logprobs_completion,
    stream_chunks,
    total_usage,
    usage_chunks,
)
from loraplex.server.serving import Serving, sampling_params
from loraplex.server.structured import compile_grammar, requested_grammar


@dataclass
class CompletionShaper(Answer):

    def _choice(self, delta: StreamDelta) -> dict:
        return {"index": delta.index, "text": delta.text, "finish_reason": finish_reason(delta),
                "logprobs": logprobs_completion(delta, self.tokenizer) if self.with_logprobs
                else None}

    def _body(self, choices: list[dict]) -> dict:
        return {"id": self.response_id, "object": "text_completion", "created": now(),
                "model": self.model, "choices": choices}

    def chunks(self, deltas: AsyncIterator[StreamDelta]) -> AsyncIterator[dict]:
        return stream_chunks(
            deltas, lambda d: self._body([self._choice(d)]) if d.text or d.finished
            or d.logprobs else None,
            lambda u: {**self._body([]), "usage": u}, self.usage_chunks)

    def whole(self, deltas: list[StreamDelta]) -> dict:
        merged = by_completion(deltas, self.n)
        return {**self._body([self._choice(m) for m in merged]),
                "usage": total_usage(merged)}


def completions_router(serving: Serving) -> APIRouter:
    router = APIRouter()
    Tenant = Annotated[Principal, Depends(serving.authenticate)]
    tokenizer = serving.tokenizer

    @router.post("/v1/completions", dependencies=[Depends(serving.has_capacity)])
    async def completions(body: CompletionRequest, request: Request,
                          principal: Tenant):
        target = serving.resolve(principal, body.model, body.user)
        if isinstance(body.prompt, str):
            try:
                prompt_ids = tokenizer.encode(body.prompt)
            except TokenizerError as e:
                raise OpenAIError(400, str(e), param="prompt") from None
        else:
            if not all(0 <= t < tokenizer.vocab_size for t in body.prompt):
                raise OpenAIError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})",
                                  param="prompt")
            prompt_ids = list(body.prompt)
        grammar = requested_grammar(body)
        if grammar is not None:
            await compile_grammar(serving.engine.grammars, *grammar)
        params = sampling_params(body, serving.max_tokens_for(body, len(prompt_ids)),
                                 body.logprobs, grammar and grammar[1])
        shaper = CompletionShaper(new_id("cmpl"), target.labels[1], tokenizer, params.n,
                                  usage_chunks(body.stream_options),
                                  params.logprobs is not None)
        return await serving.run(request, principal, target, prompt_ids, params, shaper,
                                 body.stream)

    return router
