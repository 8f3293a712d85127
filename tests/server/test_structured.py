"""Structured outputs, tool calls and logit_bias through the official openai client (and
LangChain, unmodified) against a live server; every field we do not implement is a 400 naming
it. The model is tiny and random: only the grammar makes its answers parse."""

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from loraplex.sampling_params import MAX_GRAMMAR_BYTES
from tests.server.test_app import client


class Address(BaseModel):
    city: str = Field(max_length=8)
    zip_code: int = Field(ge=0, le=99999)


class Person(BaseModel):  # nested object, array, enum, bounded numbers, optional, anyOf
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    score: float = Field(ge=0, le=1)
    role: Literal["admin", "user"]
    tags: list[str] = Field(max_length=3)
    address: Address
    nickname: str | None = Field(max_length=6)
    contact: int | Address


class Verdict(BaseModel):
    outcome: Literal["granted", "denied"]
    reasons: list[Literal["cost", "risk", "law"]] = Field(max_length=2)


WEATHER = {"type": "function", "function": {  # short: the tiny model reads characters
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "integer", "minimum": -12, "maximum": 12}}, "required": ["zone"],
        "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Fill this in"}]


@pytest.mark.parametrize("model", ["support", "sales"])
@pytest.mark.parametrize("schema", [Person, Verdict])
def test_parse_with_a_pydantic_model_gives_a_valid_object(live, model, schema):
    completion = client(live).chat.completions.parse(
        model=model, messages=ASK, response_format=schema, temperature=0, max_tokens=200)
    message = completion.choices[0].message
    assert isinstance(message.parsed, schema), message.content
    assert completion.choices[0].finish_reason == "stop"


def test_json_schema_streamed_is_the_same_object(live):
    fmt = {"type": "json_schema", "json_schema": {
        "name": "verdict", "schema": Verdict.model_json_schema(), "strict": True}}
    kwargs = dict(model="support", messages=ASK, response_format=fmt, temperature=0,
                  max_tokens=200)
    whole = client(live).chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client(
        live).chat.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), Verdict.model_json_schema())


def test_the_vllm_extras_on_both_endpoints(live):
    c = client(live)
    text = c.completions.create(model="support", prompt="code:", max_tokens=20, temperature=0,
                                extra_body={"guided_regex": r"[A-Z]{3}\d{2}"}).choices[0].text
    assert len(text) == 5 and text[:3].isupper() and text[3:].isdigit()
    choice = c.completions.create(model="support", prompt="pick", max_tokens=20,
                                  extra_body={"guided_choice": ["left", "right"]})
    assert choice.choices[0].text in ("left", "right")
    new_style = c.chat.completions.create(
        model="sales", messages=ASK, max_tokens=60, temperature=0,
        extra_body={"structured_outputs": {"json": Verdict.model_json_schema()}})
    Verdict.model_validate_json(new_style.choices[0].message.content)
    lark = c.completions.create(model="support", prompt="yes or no", max_tokens=20,
                                extra_body={"guided_grammar": 'start: "yes" | "no"'})
    assert lark.choices[0].text in ("yes", "no")


def test_a_named_tool_call_gives_arguments_that_validate(live):
    for stream in (False, True):
        kwargs = dict(model="support", messages=ASK, tools=[WEATHER, TIME], temperature=0,
                      max_tokens=120, tool_choice={"type": "function",
                                                   "function": {"name": "get_weather"}})
        if stream:
            name, arguments = None, ""
            for chunk in client(live).chat.completions.create(stream=True, **kwargs):
                for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    name = call.function.name or name
                    arguments += call.function.arguments or ""
        else:
            message = client(live).chat.completions.create(**kwargs).choices[0].message
            assert message.content is None and len(message.tool_calls) == 1
            name, arguments = message.tool_calls[0].function.name, \
                message.tool_calls[0].function.arguments
        assert name == "get_weather"
        jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_name_a_tool_with_valid_arguments(live, parallel):
    response = client(live, "globex").chat.completions.create(
        model="bot", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=parallel, temperature=0, max_tokens=200)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    if not parallel:
        assert len(choice.message.tool_calls) == 1
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in choice.message.tool_calls:
        assert call.id.startswith("call") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_conversation_with_tool_results_is_accepted(live):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_time", "arguments": '{"zone": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "14:00"}]
    response = client(live).chat.completions.create(
        model="support", messages=history, tools=[TIME], max_tokens=8, temperature=0)
    assert response.choices[0].message.role == "assistant"


def test_logit_bias_forces_a_token(live):
    token_q = 3 + ord("Q") - 32  # the tiny tokenizer: specials 0-2, then printable ASCII
    text = client(live).chat.completions.create(
        model="support", messages=ASK, max_tokens=5, temperature=0,
        logit_bias={str(token_q): 100}).choices[0].message.content
    assert text == "QQQQQ"


def test_langchain_structured_output_and_bound_tools(live):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{live.url}/v1", api_key=live.keys["acme"], model="support",
                     temperature=0, max_tokens=200, max_retries=0)
    verdict = llm.with_structured_output(Verdict).invoke("Decide")
    assert isinstance(verdict, Verdict)

    def get_time(zone: int) -> str:
        """The time in a zone."""
        return "12:00"

    message = llm.bind_tools([get_time], tool_choice="get_time").invoke("What time is it?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_time"
    assert isinstance(message.tool_calls[0]["args"]["zone"], int)


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
     "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"guided_regex": "a" * (MAX_GRAMMAR_BYTES + 1)}},
     f"at most {MAX_GRAMMAR_BYTES} bytes"),
    ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    ({"extra_body": {"guided_json": {"type": "object"}, "guided_regex": "a"}}, "each constrain"),
    ({"extra_body": {"frobnicate": True}}, "Unrecognized request argument supplied: frobnicate"),
    ({"extra_body": {"functions": [{"name": "f"}]}}, "functions"),
    ({"logit_bias": {"not-a-token": 5}}, "not a token id"),
    ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias keys must be token ids"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not in tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"response_format": {"type": "json_schema"}}, "needs a json_schema object"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"extra_body": {"guided_choice": []}}, "non-empty list"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "each constrain"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "each constrain"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "image_url"),
])
def test_bad_structured_requests_are_400s_and_others_keep_being_served(live, extra, words):
    with pytest.raises(openai.BadRequestError, match=words):
        client(live).chat.completions.create(**{"model": "support", "messages": ASK,
                                                "max_tokens": 4, **extra})
    ok = client(live, "globex").chat.completions.create(model="bot", messages=ASK,
                                                        max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_documented_no_op_fields_are_accepted(live):
    response = client(live).chat.completions.create(
        model="support", messages=ASK, max_tokens=3, store=False,
        metadata={"ticket": "42"}, extra_body={"service_tier": "auto"})
    assert response.choices[0].message.content is not None
