"""Which grammar a request's output must follow: OpenAI's `response_format` and vLLM's
`guided_*` / `structured_outputs` extras, turned into one GrammarSpec, compiled before queuing."""

import asyncio
import json

from loraplex.engine.guided import GrammarCompiler, GrammarError
from loraplex.sampling_params import GrammarSpec, SamplingParamsError
from loraplex.server.protocol import OpenAIError


def _schema_text(schema, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise OpenAIError(400, f"{param}: not valid JSON: {e}", param=param) from None
        except RecursionError:  # json's parser recurses once per nesting level
            raise OpenAIError(400, f"{param}: nested too deeply", param=param) from None
    if not isinstance(schema, dict):
        raise OpenAIError(400, f"{param}: a JSON schema must be an object", param=param)
    return json.dumps(schema)


def _requested(body) -> list[tuple[str, GrammarSpec]]:
    """Every (field, spec) the request asks for; more than one is refused by the caller."""
    found = []
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", GrammarSpec("json_object")))
    elif response_format is not None and response_format.type == "json_schema":
        fmt = response_format.json_schema
        if fmt is None:
            raise OpenAIError(400, "response_format: json_schema needs a json_schema object "
                              "with a name and a schema", param="response_format.json_schema")
        spec = (GrammarSpec("json_object") if fmt.schema_ is None else GrammarSpec(
            "json_schema", _schema_text(fmt.schema_, "response_format.json_schema.schema")))
        found.append(("response_format", spec))
    if body.guided_json is not None:
        found.append(("guided_json", GrammarSpec("json_schema",
                                                 _schema_text(body.guided_json, "guided_json"))))
    if body.guided_regex is not None:
        found.append(("guided_regex", GrammarSpec("regex", body.guided_regex)))
    if body.guided_choice is not None:
        found.append(("guided_choice", GrammarSpec("choice", json.dumps(body.guided_choice))))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", GrammarSpec("grammar", body.guided_grammar)))
    so = body.structured_outputs
    if so is not None:
        prefix = "structured_outputs."
        if so.json_ is not None:
            found.append((prefix + "json", GrammarSpec(
                "json_schema", _schema_text(so.json_, prefix + "json"))))
        if so.regex is not None:
            found.append((prefix + "regex", GrammarSpec("regex", so.regex)))
        if so.choice is not None:
            found.append((prefix + "choice", GrammarSpec("choice", json.dumps(so.choice))))
        if so.grammar is not None:
            found.append((prefix + "grammar", GrammarSpec("grammar", so.grammar)))
        if so.json_object:
            found.append((prefix + "json_object", GrammarSpec("json_object")))
    return found


def requested_grammar(body) -> tuple[str, GrammarSpec] | None:
    """The one grammar the request asks for, with the field that asked; None for free text.
    Raises OpenAIError (400) for an unusable or conflicting request."""
    try:
        found = _requested(body)
    except SamplingParamsError as e:  # e.g. larger than the stated limit
        raise OpenAIError(400, str(e)) from None
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise OpenAIError(400, f"{names} each constrain the output: send one", param=found[1][0])
    return found[0] if found else None


async def compile_grammar(grammars: GrammarCompiler, param: str, spec: GrammarSpec) -> None:
    """Compile (and cache) on a worker thread, so a grammar that cannot compile is a 400 before
    the request is queued and the engine thread never compiles."""
    try:
        await asyncio.to_thread(grammars.compile, spec)
    except GrammarError as e:
        raise OpenAIError(400, f"{param}: {e}", param=param) from None
