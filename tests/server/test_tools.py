"""Tool calls without a model: the fallback prompt format, "auto" parsing (whole and streamed in
any split), and the grammars of "required" and named choices."""

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex.server.protocol import ChatCompletionRequest
from loraplex.server.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    AutoCallStream,
    ToolChoice,
    parse_calls,
    template_knows_tools,
    template_messages,
    tool_grammar,
)

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                 **fields)


def test_a_template_without_tools_gets_the_fallback_format():
    body = ChatCompletionRequest(model="m", tools=[TOOL], messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "find cats"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "lookup", "arguments": '{"q": "cats"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3 cats"}])
    messages = template_messages(body, knows_tools=False)
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert '"name":"lookup"' in messages[0]["content"] and CALL_OPEN in messages[0]["content"]
    assert messages[2]["content"] == f'{CALL_OPEN}{{"name": "lookup", "arguments": ' \
                                     f'{{"q": "cats"}}}}{CALL_CLOSE}'
    assert messages[3] == {"role": "user", "content": "<tool_response>\n3 cats\n</tool_response>"}
    kept = template_messages(body, knows_tools=True)
    assert kept[2]["tool_calls"][0]["function"]["name"] == "lookup"
    assert kept[3]["role"] == "tool" and kept[3]["tool_call_id"] == "c1"
    assert template_knows_tools("{% for t in tools %}{{ t }}{% endfor %}")
    assert not template_knows_tools("{{ messages }}")


AUTO_TEXT = (f'Let me look. {CALL_OPEN}{{"name": "lookup", "arguments": {{"q": "a<b"}}}}'
             f'{CALL_CLOSE} and {CALL_OPEN}{{"name": "other", "arguments": {{}}}}{CALL_CLOSE} <t')


def test_auto_reads_the_calls_of_known_tools_and_keeps_the_rest_as_content():
    content, calls = parse_calls(AUTO_TEXT, ToolChoice("auto"), request(tools=[TOOL]))
    assert [c["function"]["name"] for c in calls] == ["lookup"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"q": "a<b"}
    # An unknown tool's block is content after all; so is a trailing "<t".
    assert content == f'Let me look.  and {CALL_OPEN}{{"name": "other", "arguments": {{}}}}' \
                      f'{CALL_CLOSE} <t'
    assert parse_calls("no calls here", ToolChoice("auto"), request(tools=[TOOL])) == (
        "no calls here", [])


def test_auto_without_parallel_calls_keeps_one_call():
    twice = (f'{CALL_OPEN}{{"name": "lookup", "arguments": {{"q": "a"}}}}{CALL_CLOSE}'
             f'{CALL_OPEN}{{"name": "lookup", "arguments": {{"q": "b"}}}}{CALL_CLOSE}')
    content, calls = parse_calls(twice, ToolChoice("auto"),
                                 request(tools=[TOOL], parallel_tool_calls=False))
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"q": "a"}]
    assert content == f'{CALL_OPEN}{{"name": "lookup", "arguments": {{"q": "b"}}}}{CALL_CLOSE}'
    assert len(parse_calls(twice, ToolChoice("auto"), request(tools=[TOOL]))[1]) == 2


@given(st.lists(st.integers(0, len(AUTO_TEXT)), max_size=12))
def test_streaming_auto_in_any_split_gives_the_same_content_and_calls(cuts):
    stream = AutoCallStream({"lookup"})
    bounds = [0, *sorted(cuts), len(AUTO_TEXT)]
    content = "".join(stream.feed(AUTO_TEXT[a:b]) for a, b in itertools.pairwise(bounds))
    content += stream.finish()
    whole, calls = parse_calls(AUTO_TEXT, ToolChoice("auto"), request(tools=[TOOL]))
    assert content.strip() == whole
    assert [c["function"] for c in stream.calls] == [c["function"] for c in calls]


def test_forced_choices_are_grammars_over_the_tools_schemas():
    named = tool_grammar(request(tools=[TOOL]), ToolChoice("named", "lookup"))
    assert json.loads(named.value) == TOOL["function"]["parameters"]
    one = json.loads(tool_grammar(request(tools=[TOOL], parallel_tool_calls=False),
                                  ToolChoice("required")).value)
    assert one["minItems"] == 1 and one["maxItems"] == 1
    assert one["items"]["anyOf"][0]["properties"]["name"] == {"const": "lookup"}
    assert tool_grammar(request(tools=[TOOL]), ToolChoice("auto")) is None


@pytest.mark.parametrize("text, mode", [('{"q": "x"', "named"), ('[{"name": "lookup"', "required")])
def test_a_call_cut_short_by_max_tokens_stays_content(text, mode):
    choice = ToolChoice(mode, "lookup" if mode == "named" else None)
    assert parse_calls(text, choice, request(tools=[TOOL])) == (text, [])
