"""POST /v1/chat/completions: messages (and tools) in, a message (content or tool calls) out."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from loraplex.engine.async_engine import StreamDelta
from loraplex.model.tokenizer import TokenizerError
from loraplex.registry.tenants import Principal
from loraplex.server.protocol import ChatCompletionRequest, OpenAIError, new_id, now
from loraplex.server.responses import (
    Answer,
    by_completion,
    finish_reason,
    logprobs_chat,
    stream_chunks,
    total_usage,
    usage_chunks,
)
from loraplex.server.serving import Serving, sampling_params
from loraplex.server.structured import compile_grammar, requested_grammar
from loraplex.server.tools import (
    AutoCallStream,
    ToolChoice,
    auto_call_stream,
    parse_calls,
    template_knows_tools,
    template_messages,
    template_tools,
    tool_choice,
    tool_grammar,
)


def _finish(delta: StreamDelta, choice: ToolChoice, calls: list[dict]) -> str | None:
    """OpenAI's finish reason: "tool_calls" when the model chose to call (a forced, named
    call finishes with "stop", as OpenAI's does)."""
    reason = finish_reason(delta)
    if reason == "stop" and calls and choice.mode != "named":
        return "tool_calls"
    return reason


@dataclass
class ChatShaper(Answer):
    choice: ToolChoice
    body: ChatCompletionRequest
    _text: dict[int, str] = field(default_factory=dict)  # "required": the JSON so far
    _auto: dict[int, AutoCallStream] = field(default_factory=dict)
    _calls: dict[int, int] = field(default_factory=dict)  # calls given out, per completion

    def _body(self, choices: list[dict]) -> dict:
        return {"id": self.response_id, "object": "chat.completion.chunk", "created": now(),
                "model": self.model, "choices": choices}

    def _chunk(self, delta: StreamDelta, message: dict, calls: list[dict]) -> dict:
        return self._body([{
            "index": delta.index, "delta": {"role": "assistant", **message},
            "finish_reason": _finish(delta, self.choice, calls) if delta.finished else None,
            "logprobs": logprobs_chat(delta, self.tokenizer) if self.with_logprobs else None}])

    def _streamed_calls(self, index: int, calls: list[dict]) -> list[dict]:
        """New whole calls in the stream's shape (each with its position)."""
        first = self._calls.get(index, 0)
        self._calls[index] = first + len(calls)
        return [{"index": first + i, **call} for i, call in enumerate(calls)]

    def _message_delta(self, delta: StreamDelta) -> tuple[dict, list[dict]]:
        """What this delta adds to the message, and every call of the completion so far."""
        mode, i = self.choice.mode, delta.index
        if mode == "named":
            # The output is the arguments: the call's id and name come with the first fragment.
            call = {"index": 0, "function": {"arguments": delta.text}}
            if i not in self._calls:
                self._calls[i] = 1
                call = {"index": 0, "id": new_id("call"), "type": "function",
                        "function": {"name": self.choice.name, "arguments": delta.text}}
            return {"content": None, "tool_calls": [call]}, [call]
        if mode == "required":
            self._text[i] = self._text.get(i, "") + delta.text
            if not delta.finished:
                return {"content": None}, []
            content, calls = parse_calls(self._text[i], self.choice, self.body)
            if not calls:
                return {"content": content}, []
            return {"content": None, "tool_calls": self._streamed_calls(i, calls)}, calls
        if mode == "auto":
            stream = self._auto.setdefault(i, auto_call_stream(self.body))
            before = len(stream.calls)
            content = stream.feed(delta.text) + (stream.finish() if delta.finished else "")
            message = {"content": content}
            if len(stream.calls) > before:
                message["tool_calls"] = self._streamed_calls(i, stream.calls[before:])
            return message, stream.calls
        return {"content": delta.text}, []

    def _delta_chunk(self, delta: StreamDelta) -> dict | None:
        if not delta.shows_anything:
            return None
        message, calls = self._message_delta(delta)
        if message.get("content") or message.get("tool_calls") or delta.finished \
                or delta.logprobs:
            return self._chunk(delta, message, calls)
        return None  # e.g. a "required" call still being generated

    def chunks(self, deltas: AsyncIterator[StreamDelta]) -> AsyncIterator[dict]:
        return stream_chunks(deltas, self._delta_chunk,
                             lambda u: {**self._body([]), "usage": u}, self.usage_chunks)

    def whole(self, deltas: list[StreamDelta]) -> dict:
        merged = by_completion(deltas, self.n)
        choices = []
        for m in merged:
            content, calls = parse_calls(m.text, self.choice, self.body)
            message = {"role": "assistant", "content": content, "refusal": None}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": m.index, "message": message,
                            "finish_reason": _finish(m, self.choice, calls),
                            "logprobs": logprobs_chat(m, self.tokenizer) if self.with_logprobs
                            else None})
        return {"id": self.response_id, "object": "chat.completion", "created": now(),
                "model": self.model, "choices": choices,
                "usage": total_usage(merged)}


class Chat:
    """A chat completion for an authenticated tenant principal: the route's, and the console
    playground's (the same resolution, quotas, metering and streaming)."""

    def __init__(self, serving: Serving):
        self.serving, self.tokenizer = serving, serving.tokenizer
        self.knows_tools = template_knows_tools(self.tokenizer.chat_template)

    async def __call__(self, body: ChatCompletionRequest, request: Request, principal):
        serving, tokenizer = self.serving, self.tokenizer
        target = serving.resolve(principal, body.model, body.user)
        choice = tool_choice(body)
        try:
            prompt_ids = tokenizer.encode_chat(
                template_messages(body, self.knows_tools),
                tools=template_tools(body) if self.knows_tools else None)
        except TokenizerError as e:
            raise OpenAIError(400, str(e), param="messages") from None
        grammar = requested_grammar(body)
        forced = tool_grammar(body, choice)
        if forced is not None and grammar is not None:
            raise OpenAIError(400, f"tool_choice {choice.name or choice.mode!r} and "
                              f"{grammar[0]} each constrain the output: send one",
                              param="tool_choice")
        if forced is not None:
            grammar = ("tools", forced)
        if grammar is not None:
            await compile_grammar(serving.engine.grammars, *grammar)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, serving.max_tokens_for(body, len(prompt_ids)), logprobs,
                                 grammar and grammar[1])
        shaper = ChatShaper(new_id("chatcmpl"), target.labels[1], tokenizer, params.n,
                            usage_chunks(body.stream_options),
                            logprobs is not None, choice, body)
        return await serving.run(request, principal, target, prompt_ids, params, shaper,
                                 body.stream)


def chat_router(serving: Serving) -> APIRouter:
    router = APIRouter()
    Tenant = Annotated[Principal, Depends(serving.authenticate)]
    chat = Chat(serving)

    @router.post("/v1/chat/completions", dependencies=[Depends(serving.has_capacity)])
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               principal: Tenant):
        return await chat(body, request, principal)

    return router
