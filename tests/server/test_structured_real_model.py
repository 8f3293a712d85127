"""Structured outputs and forced tool calls on the default model (SmolLM2-135M) and a tenant's
adapter for it, through the official openai client: what an agency's client app would send."""

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from loraplex.bench.adapters import write_random_adapter
from loraplex.config import EngineConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.model.loader import read_config
from loraplex.model.pull import resolve_model
from loraplex.registry import Registry
from loraplex.server.app import ServerSettings, create_app
from loraplex.server.thread import ServerThread
from loraplex.vault.artifacts import ArtifactSealer

pytestmark = pytest.mark.real_model
BASE = "smollm2"


class Party(BaseModel):
    name: str = Field(max_length=40)
    role: Literal["plaintiff", "defendant", "witness"]


class CaseSummary(BaseModel):  # the seed's law firm: a structured legal summary
    title: str = Field(max_length=60)
    parties: list[Party] = Field(min_length=1, max_length=3)
    year: int = Field(ge=1900, le=2100)
    damages_usd: float | None = Field(ge=0)
    outcome: Literal["settled", "dismissed", "judgment", "pending"]


CASE = [{"role": "user", "content": "Summarize: In 2019 Acme Corp sued Bob Smith for breach of "
         "contract and asked for 50000 dollars; the parties settled in 2020."}]
LOOKUP = {"type": "function", "function": {
    "name": "find_order", "description": "Look up a customer's order",
    "parameters": {"type": "object", "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
        "include_items": {"type": "boolean"}},
        "required": ["order_id", "include_items"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = resolve_model("smollm2-135m")
    home = tmp_path_factory.mktemp("home")
    registry = Registry(home)
    registry.create_tenant("lawfirm", actor="test")
    _, key = registry.create_key("lawfirm", actor="test")
    registry.set_base_model_access("lawfirm", True, actor="test")
    adapter = write_random_adapter(tmp_path_factory.mktemp("adapter"), read_config(model_dir),
                                   rank=8, seed=1)
    registry.push_version("lawfirm", "briefs", adapter, actor="test", validate=None,
                          sealer=ArtifactSealer.for_home(home))
    engine = AsyncEngine(EngineConfig(model=str(model_dir), dtype="float32", max_loras=2,
                                      max_lora_rank=8, max_model_len=1024,
                                      kv_cache_bytes=1 << 27))
    with ServerThread(create_app(engine, registry, ServerSettings(base_model_name=BASE))) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)


@pytest.mark.parametrize("model", [BASE, "briefs"])
def test_a_legal_summary_parses_and_validates(server, model):
    completion = server.chat.completions.parse(model=model, messages=CASE, temperature=0,
                                               response_format=CaseSummary, max_tokens=300)
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(completion.choices[0].message.parsed, CaseSummary)


def test_streaming_gives_the_same_object(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "case",
                                                  "schema": CaseSummary.model_json_schema()}}
    kwargs = dict(model=BASE, messages=CASE, temperature=0, response_format=fmt, max_tokens=300)
    whole = server.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in server.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), CaseSummary.model_json_schema())


def test_json_object_is_one_object(server):
    answer = server.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Return a JSON object with the keys "
                              "name and age for Tom, a cat aged 3."}],
        temperature=0, max_tokens=300, response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.parametrize("model", [BASE, "briefs"])
def test_a_required_tool_call_has_valid_arguments(server, model):
    response = server.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Where is my order AB1234?"}],
        tools=[LOOKUP], tool_choice="required", temperature=0, max_tokens=120)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        assert call.function.name == "find_order"
        jsonschema.validate(json.loads(call.function.arguments),
                            LOOKUP["function"]["parameters"])
