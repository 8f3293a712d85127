"""Tool calling: the tools in the prompt, `tool_choice` as a grammar, and the model's calls parsed
back into OpenAI's `tool_calls`.

- "required" and a named function are enforced by a grammar: a named function's output is its
  arguments object (valid against its `parameters` schema); "required" is a JSON array of
  {"name", "arguments"} objects, one of the tools each (exactly one when parallel_tool_calls is
  false).
- "auto" lets the model choose; its calls are read in the Hermes format most open models are
  tuned on, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and the text around them
  is the message's content. "none" describes the tools but never parses calls.
- A chat template that knows tools (it reads a `tools` variable) renders them, the assistant's
  earlier `tool_calls` and the `tool` messages itself. Any other template gets the fallback
  format: the tool list and the call format in a system message, earlier calls as
  `<tool_call>` blocks in the assistant's content, tool results as user messages in
  `<tool_response>` blocks.
"""

import json
import uuid
from dataclasses import dataclass

from loraplex.sampling_params import GrammarSpec
from loraplex.server.protocol import ChatCompletionRequest, OpenAIError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FALLBACK_INSTRUCTIONS = (
    f'To call a function, answer {CALL_OPEN}{{"name": ..., "arguments": {{...}}}}{CALL_CLOSE}'
    " for each call. Functions:\n")


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none" | "auto" | "required" | "named"
    name: str | None = None  # the function, when named


def tool_choice(body: ChatCompletionRequest) -> ToolChoice:
    """The effective choice (OpenAI's defaults: "auto" with tools, "none" without); a 400 for a
    choice that names no tool."""
    tools = body.tools or []
    choice = body.tool_choice
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice != "none" and not tools:
            raise OpenAIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        return ToolChoice(choice)
    if choice.function.name not in {t.function.name for t in tools}:
        raise OpenAIError(400, f"tool_choice names {choice.function.name!r}, which is not in "
                          "tools", param="tool_choice")
    return ToolChoice("named", choice.function.name)


def _parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_grammar(body: ChatCompletionRequest, choice: ToolChoice) -> GrammarSpec | None:
    tools = body.tools or []
    if choice.mode == "named":
        tool = next(t for t in tools if t.function.name == choice.name)
        return GrammarSpec("json_schema", json.dumps(_parameters(tool)))
    if choice.mode != "required":
        return None
    call = {"anyOf": [
        {"type": "object", "properties": {"name": {"const": t.function.name},
                                          "arguments": _parameters(t)},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools]}
    array = {"type": "array", "items": call, "minItems": 1}
    if not body.parallel_tool_calls:
        array["maxItems"] = 1
    return GrammarSpec("json_schema", json.dumps(array))


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def template_messages(body: ChatCompletionRequest, knows_tools: bool) -> list[dict]:
    """The conversation as the chat template reads it (see the module docstring)."""
    messages = []
    for m in body.messages:
        message = {"role": m.role, "content": m.text()}
        if m.name is not None:
            message["name"] = m.name
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                 for c in m.tool_calls or []]
        if knows_tools:
            if calls:
                message["tool_calls"] = calls
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
        elif calls:
            blocks = "".join(
                f'{CALL_OPEN}{{"name": {json.dumps(c["function"]["name"])}, "arguments": '
                f'{c["function"]["arguments"]}}}{CALL_CLOSE}' for c in calls)
            message["content"] = message["content"] + blocks
        elif m.role == "tool":
            message = {"role": "user",
                       "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
        messages.append(message)
    if body.tools and not knows_tools:
        listing = "\n".join(json.dumps(t.function.model_dump(exclude_none=True),
                                       separators=(",", ":")) for t in body.tools)
        instructions = FALLBACK_INSTRUCTIONS + listing
        if messages and messages[0]["role"] in ("system", "developer"):
            messages[0] = {**messages[0],
                           "content": f"{messages[0]['content']}\n\n{instructions}"}
        else:
            messages.insert(0, {"role": "system", "content": instructions})
    return messages


def template_tools(body: ChatCompletionRequest) -> list[dict] | None:
    """The tools as a tools-aware template reads them (OpenAI's own shape)."""
    return [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None


def _call(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": text}}


def _read_block(block: str, names: set[str]) -> dict | None:
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not (isinstance(call, dict) and call.get("name") in names
            and isinstance(call.get("arguments", {}), dict)):
        return None
    return _call(call["name"], call.get("arguments", {}))


def parse_calls(text: str, choice: ToolChoice, body: ChatCompletionRequest,
                ) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer. Output cut short (max_tokens) that does not
    parse stays content, with no calls."""
    if choice.mode == "named":
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [_call(choice.name, text)]
    if choice.mode == "required":
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [_call(c["name"], c["arguments"]) for c in calls]
    if choice.mode != "auto":
        return text, []
    stream = auto_call_stream(body)
    content = stream.feed(text) + stream.finish()
    return (content.strip() or None) if stream.calls else text, stream.calls


class AutoCallStream:
    """Reads "auto" output as it streams: text outside `<tool_call>` blocks goes out as content
    (held back only while it could be the start of a block); each block becomes a call once it
    closes. A block that does not parse as a call of one of the tools, or one past `max_calls`
    (1 when parallel_tool_calls is false), is content after all."""

    def __init__(self, names: set[str], max_calls: int | None = None):
        self.names = names
        self.max_calls = max_calls
        self.calls: list[dict] = []
        self._pending = ""  # text not yet given out
        self._in_block = False

    def feed(self, text: str) -> str:
        """New text in; the content that can be given out now."""
        self._pending += text
        out = []
        while True:
            if self._in_block:
                end = self._pending.find(CALL_CLOSE)
                if end < 0:
                    return "".join(out)
                block = self._pending[:end]
                self._pending = self._pending[end + len(CALL_CLOSE):]
                self._in_block = False
                call = _read_block(block.strip(), self.names)
                if call is None or len(self.calls) == self.max_calls:
                    out.append(CALL_OPEN + block + CALL_CLOSE)
                else:
                    self.calls.append(call)
                continue
            start = self._pending.find(CALL_OPEN)
            if start >= 0:
                out.append(self._pending[:start])
                self._pending = self._pending[start + len(CALL_OPEN):]
                self._in_block = True
                continue
            keep = next((k for k in range(min(len(CALL_OPEN) - 1, len(self._pending)), 0, -1)
                         if CALL_OPEN.startswith(self._pending[-k:])), 0)
            cut = len(self._pending) - keep
            out.append(self._pending[:cut])
            self._pending = self._pending[cut:]
            return "".join(out)

    def finish(self) -> str:
        """The end of the answer: what is still held back is content (an unclosed block too)."""
        rest = (CALL_OPEN if self._in_block else "") + self._pending
        self._pending, self._in_block = "", False
        if self.calls:
            rest = rest.strip()
        return rest


def auto_call_stream(body: ChatCompletionRequest) -> AutoCallStream:
    """The "auto" reader for a request: its tools' names, one call unless parallel."""
    return AutoCallStream({t.function.name for t in body.tools or []},
                          None if body.parallel_tool_calls else 1)
