"""Fuzz targets: the HTTP API's request bodies, sent to the whole app in-process (every
middleware, handler and the engine on the tiny model), one target per API area.

Each body starts valid and may get mutations: a field set to any JSON value (strings with
lone surrogates and thousands-deep nesting among them) or removed, an unknown field, the whole
body replaced by other JSON or by bytes, a wrong content type. Property: never a 5xx; every
4xx is a JSON body in OpenAI's error shape {"error": {"message", "type", "param", "code"}}
with a message; a streamed answer's events are JSON, none a server error; an unmutated body
is answered 2xx (or the 409 of a name taken by an earlier input).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from loraplex.faults.fuzz import ACCEPTED, REFUSED, Fault, Target
from loraplex.faults.fuzz_adapters import JSON

LONE_SURROGATE = "\ud800"


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


# Values no schema expects: deep nesting, half a character, a huge number, NaN (json.dumps writes
# it; a strict parser refuses it).
HOSTILE_TEXT = st.sampled_from((LONE_SURROGATE, f"a{LONE_SURROGATE}b", "", " " * 3, "x" * 5000,
                                "\x00", "[" * 5000, "<|im_end|>", "{{ 7*7 }}", "v1", "-1"))
HOSTILE = HOSTILE_TEXT | st.sampled_from((_nested(900), {"a": {"b": {"c": None}}}, 10**30, -1,
                                          0, float("nan"), float("inf"), [], {}, True))
VALUES = JSON | HOSTILE
NAME = st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)
TEXT = st.text(min_size=1, max_size=30).filter(str.strip)


@dataclass
class Call:
    """One request: `body` JSON (or raw bytes); `expect` "ok" (2xx, or the 409 of a taken
    name) or "either"."""

    method: str
    path: str
    body: object = None
    content_type: str = "application/json"
    who: str = "tenant"  # whose key: "tenant" (t00), "admin", "none"
    expect: str = "ok"
    mutations: list[str] = field(default_factory=list)


@dataclass
class FuzzApp:
    """The app in-process with its test client, and what the targets' bodies refer to."""

    client: object  # starlette's TestClient
    app: object
    home: object  # the FaultHome: tenants t00 (the fuzzed one) and t01, their keys
    training_file: str  # a file id of t00's, for fine-tuning jobs
    spare_key_id: str  # a t01 key the rotation bodies may rotate

    def headers(self, who: str) -> dict[str, str]:
        key = {"tenant": self.home.keys["t00"], "admin": self.home.admin_key}.get(who)
        return {"authorization": f"Bearer {key}"} if key else {}


@contextlib.contextmanager
def fuzz_app(root: Path, model_dir: Path) -> Iterator[FuzzApp]:
    """The whole app on the tiny model, its training queue never running a job (a fuzzed
    job is checked and queued, not trained)."""
    from starlette.testclient import TestClient

    from loraplex.config import EngineConfig
    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.faults.harness import make_home
    from loraplex.registry import Registry
    from loraplex.server.app import ServerSettings, create_app
    from loraplex.train.jobs import TrainingJobs
    from loraplex.validation import adapter_validator

    fault_home = make_home(root, 2, model_dir)
    registry = Registry(fault_home.home)
    engine = AsyncEngine(EngineConfig(model=str(model_dir), max_loras=2, max_cpu_loras=4,
                                      max_lora_rank=16, max_model_len=256,
                                      kv_cache_bytes=1 << 22, adapter_cache=False))
    settings = ServerSettings(base_model_name="tiny-base", max_tokens_cap=8,
                              max_body_bytes=1 << 20, max_upload_bytes=1 << 22,
                              prewarm_adapters=0)
    jobs = TrainingJobs(fault_home.home, str(model_dir), max_running=0)
    app = create_app(engine, registry, settings, adapter_validator(str(model_dir)), jobs=jobs)
    spare_key_id = registry.create_key("t01", actor="fuzz")[0]
    with TestClient(app) as client:
        auth = {"authorization": f"Bearer {fault_home.keys['t00']}"}
        line = json.dumps({"prompt": "Hi", "completion": "Hello!"}).encode() + b"\n"
        assert client.post("/tenants/t00/datasets/data", content=line * 4,
                           headers=auth).status_code == 201
        uploaded = client.post("/v1/files", headers=auth, data={"purpose": "fine-tune"},
                               files={"file": ("data.jsonl", line * 4)})
        assert uploaded.status_code == 200, uploaded.text
        yield FuzzApp(client, app, fault_home, uploaded.json()["id"], spare_key_id)
    registry.close()


# -- valid bodies -------------------------------------------------------------------------
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(("system", "user")),
                                           "content": TEXT}), max_size=2).map(
    lambda before: [*before, {"role": "user", "content": "Hello"}])
SAMPLING = {"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "n": st.integers(1, 2),
            "stream": st.booleans(), "stop": st.lists(TEXT, max_size=2),
            "seed": st.integers(0, 2**31), "top_k": st.integers(-1, 50),
            "presence_penalty": st.floats(-2, 2), "user": TEXT}
CHAT = st.fixed_dictionaries(
    {"model": st.sampled_from(("bot", "bot:v1", "bot:v2")), "messages": MESSAGES,
     "max_tokens": st.integers(1, 4)},
    optional={**SAMPLING, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3),
              "response_format": st.builds(dict, type=st.just("json_object"))})
COMPLETION = st.fixed_dictionaries(
    {"model": st.sampled_from(("bot", "bot:v2")),
     "prompt": TEXT | st.lists(st.integers(0, 200), min_size=1, max_size=8),
     "max_tokens": st.integers(1, 4)}, optional={**SAMPLING, "logprobs": st.integers(0, 3)})
HYPER = st.fixed_dictionaries({}, optional={
    "n_epochs": st.integers(1, 3) | st.just("auto"), "batch_size": st.integers(1, 4),
    "learning_rate_multiplier": st.floats(0.1, 2)})


def fine_tuning_job(app: FuzzApp):
    return st.fixed_dictionaries(
        {"model": st.sampled_from(("bot", "tiny-base")), "training_file": st.just(
            app.training_file)},
        optional={"hyperparameters": HYPER, "suffix": NAME, "seed": st.integers(0, 2**31 - 1),
                  "metadata": st.dictionaries(NAME, TEXT, max_size=3)})


def admin_calls(app: FuzzApp):
    rotate = f"/admin/keys/{app.spare_key_id}/rotate"
    tenant = "/admin/tenants/t01"
    return st.one_of(
        st.builds(lambda b: Call("POST", "/admin/tenants", b, who="admin"),
                  st.fixed_dictionaries({"name": NAME}, optional={
                      "allow_base_model": st.booleans()})),
        st.builds(lambda b: Call("PATCH", f"{tenant}/quota", b, who="admin"),
                  st.fixed_dictionaries({}, optional={
                      "tier": st.floats(0.1, 10), "requests_per_minute": st.integers(1000, 10**6),
                      "max_concurrent": st.integers(4, 64)})),
        st.builds(lambda v: Call("POST", f"{tenant}/adapters/bot/promote", {"version": v},
                                 who="admin"), st.integers(1, 2)),
        st.builds(lambda w: Call("PUT", f"{tenant}/adapters/bot/split",
                                 {"split": {"v1": w, "v2": 100 - w}}, who="admin"),
                  st.integers(1, 99)),  # a version in a split has a positive weight
        st.builds(lambda s: Call("POST", rotate, {"overlap_seconds": s}, who="admin",
                                 expect="either"), st.integers(60, 3600)),
    )


def tenant_calls():
    return st.one_of(
        st.builds(lambda b: Call("POST", "/tenants/t00/training-jobs", b),
                  st.fixed_dictionaries({"dataset": st.just("data"), "adapter": NAME}, optional={
                      "rank": st.integers(1, 16), "epochs": st.integers(1, 2),
                      "lr": st.floats(1e-5, 1e-2), "eval_fraction": st.floats(0, 0.5)})),
        st.builds(lambda b: Call("PUT", "/tenants/t00/fine-tuning-settings",
                                 {"promote_new_versions": b}), st.booleans()),
    )


# -- mutations ----------------------------------------------------------------------------
@st.composite
def mutated(draw, calls) -> Call:
    call = draw(calls)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(("field", "field", "nested", "text", "drop", "body", "raw",
                                     "who")))
        body = call.body
        if kind == "text" and _text_leaves(body):
            container, key = draw(st.sampled_from(_text_leaves(body)))
            container[key] = draw(HOSTILE_TEXT)
            call.mutations.append(f"text {key!r} = {container[key]!r:.40}")
        elif kind in ("field", "nested", "drop") and isinstance(body, dict) and body:
            body = dict(body)
            key = draw(st.sampled_from(sorted(body)) | st.text(max_size=8))
            if kind == "drop":
                body.pop(key, None)
            elif kind == "nested" and isinstance(body.get(key), dict | list) and body[key]:
                inner = body[key]
                inner = dict(inner) if isinstance(inner, dict) else list(inner)
                at = draw(st.sampled_from(sorted(inner) if isinstance(inner, dict)
                                          else range(len(inner))))
                inner[at] = draw(VALUES)
                body[key] = inner
            else:
                body[key] = draw(VALUES)
            call.mutations.append(f"{kind} {key!r}")
        elif kind == "raw":
            body = draw(st.binary(max_size=40) | st.sampled_from(
                (b"[" * 50_000, b'{"model": ' * 20_000, b"", b"{", b"null", b"\xff")))
            call.mutations.append(f"raw {body[:30]!r}")
        elif kind == "who":
            call.who = draw(st.sampled_from(("tenant", "admin", "none")))
            call.mutations.append(f"key of {call.who}")
            if draw(st.booleans()):
                call.content_type = draw(st.sampled_from(("text/plain", "", "application/x")))
        else:
            body = draw(VALUES)
            call.mutations.append(f"body {body!r:.40}")
        call.body = body
        call.expect = "either"
    return call


def _text_leaves(body, found=None) -> list[tuple[object, object]]:
    """(container, key) of every string in `body` (edited in place: bodies are fresh draws)."""
    found = [] if found is None else found
    items = body.items() if isinstance(body, dict) else enumerate(body) if isinstance(
        body, list) else ()
    for key, value in items:
        if isinstance(value, str):
            found.append((body, key))
        else:
            _text_leaves(value, found)
    return found


# -- the property -------------------------------------------------------------------------
def check_error_shape(status: int, text: str) -> None:
    """A Fault unless `text` is OpenAI's error body (schemathesis' stateful run checks it too)."""
    try:
        error = json.loads(text)["error"]
        assert isinstance(error["message"], str) and error["message"].strip()
        assert isinstance(error["type"], str)
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise Fault(f"{status} without OpenAI's error shape: {text[:300]!r}") from None


def _check_stream(response) -> None:
    for line in response.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        try:
            event = json.loads(line[len("data: "):])
        except ValueError:
            raise Fault(f"a streamed event is not JSON: {line[:200]!r}") from None
        if isinstance(event, dict) and event.get("error", {}).get("type") == "server_error":
            raise Fault(f"a streamed server error: {line[:300]}")


def send(app: FuzzApp, call: Call) -> str:
    if isinstance(call.body, bytes):
        content = call.body
    else:
        # allow_nan: NaN and Infinity as Python writes them, which a strict parser refuses.
        content = json.dumps(call.body).encode("utf-8", "surrogatepass")
    headers = app.headers(call.who) | ({"content-type": call.content_type}
                                       if call.content_type else {})
    response = app.client.request(call.method, call.path, content=content, headers=headers)
    status = response.status_code
    if status >= 500:
        raise Fault(f"{status}: {response.text[:300]!r}")
    if status >= 400:
        check_error_shape(status, response.text)
        if call.expect == "ok" and status != 409:
            raise Fault(f"a valid request was refused: {status} {response.text[:300]!r}")
        return REFUSED
    if "text/event-stream" in response.headers.get("content-type", ""):
        _check_stream(response)
    return ACCEPTED


def request_targets(app: FuzzApp) -> list[Target]:
    def target(name: str, calls) -> Target:
        return Target(name, mutated(calls), lambda call: send(app, call))

    return [
        target("chat_completions", CHAT.map(lambda b: Call("POST", "/v1/chat/completions", b))),
        target("completions", COMPLETION.map(lambda b: Call("POST", "/v1/completions", b))),
        target("fine_tuning_jobs", fine_tuning_job(app).map(
            lambda b: Call("POST", "/v1/fine_tuning/jobs", b))),
        target("admin_routes", admin_calls(app)),
        target("tenant_routes", tenant_calls()),
    ]
