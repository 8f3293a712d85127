"""What the API schema (/openapi.json) says beyond what FastAPI infers from the routes: the error
body every refusal has, and the links from an answer to the operations that act on what it
names (clients and schemathesis' stateful tests follow them: a created tenant's keys, a created
key's revocation)."""

import re

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAIError.body(), as the schema documents it."""

    error: ErrorDetail


# Every refusal of every route. Without it FastAPI documents a 422 with its own validation body,
# which this app never sends (its validation errors are 400s in this shape).
ERROR_RESPONSES = {"4XX": {"model": ErrorBody, "description": "Refused: OpenAI's error body"}}


def linked(status: int, parameters: dict[str, str], *operations: str) -> dict:
    """`responses=` for a route whose `status` answer names what each of `operations`
    ("METHOD /path/{param}") acts on; `parameters` maps a path parameter to a runtime expression
    ("$response.body#/name"), and each operation gets those its path has."""
    links = {}
    for operation in operations:
        method, path = operation.split(" ")
        pointer = path.replace("~", "~0").replace("/", "~1")  # JSON pointer escaping
        links[method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", path).rstrip("_")] = {
            "operationRef": f"#/paths/{pointer}/{method.lower()}",
            "parameters": {name: value for name, value in parameters.items()
                           if f"{{{name}}}" in path}}
    return {status: {"links": links}}
