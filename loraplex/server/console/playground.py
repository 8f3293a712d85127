"""The playground: one prompt to two models of a tenant side by side (two versions, a version
and the split, or a version and the base model), streamed.

The browser posts to /console/playground/chat and reads the same server-sent events as
/v1/chat/completions gives, from the same code (routes/chat.py's Chat): the model name is
resolved for the tenant, the tenant's quotas apply and the usage is billed to it. A tenant's
session asks as its own key; the operator's asks as the tenant it picked (its admin key id is
what the ledger records as the key).
"""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraplex.registry import TENANT, Principal
from loraplex.server.console.context import PREFIX, Console, render
from loraplex.server.console.guard import ConsoleRoute, check_csrf, signed_in, tenant_scope
from loraplex.server.console.sessions import Session
from loraplex.server.protocol import ChatCompletionRequest, OpenAIError

MAX_PLAYGROUND_TOKENS = 512


class PlaygroundAsk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=200)
    messages: list[dict] = Field(min_length=1, max_length=100)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_PLAYGROUND_TOKENS)  # None: the cap
    temperature: float = Field(default=0.0, ge=0, le=2)


def model_choices(console: Console, tenant: str) -> list[tuple[str, str]]:
    """(model name, what it means) the tenant can ask: each adapter's split, each version
    pinned ("support:v2"), and the base model when the tenant may use it."""
    choices = []
    for info in console.registry.list_adapters(tenant):
        choices.append((info.name, f"{info.name} (the deployment's split)"))
        choices += [(f"{info.name}:{v.label}", f"{info.name} {v.label}") for v in info.versions]
    if console.registry.tenant_may_use_base(console.registry.get_tenant(tenant).id):
        choices.append((console.base_model_name, f"{console.base_model_name} (base model)"))
    return choices


def acting_principal(console: Console, session: Session, tenant: str) -> Principal:
    """The tenant principal the request runs as (tenant_scope has checked the tenant)."""
    if not session.is_admin:
        return session.principal
    tenant_id = console.registry.get_tenant(tenant).id
    return Principal(session.principal.key_id, TENANT, tenant_id, tenant)


def playground_routes(console: Console) -> APIRouter:
    router = APIRouter(prefix=f"{PREFIX}/playground", route_class=ConsoleRoute)
    Signed = Annotated[Session, Depends(signed_in(console))]

    @router.get("")
    async def page(request: Request, session: Signed, tenant: str = ""):
        tenants = ([t.name for t in console.registry.list_tenants()] if session.is_admin
                   else [session.principal.tenant_name])
        tenant = tenant or (tenants[0] if tenants else "")
        choices = []
        if tenant:
            tenant_scope(console, session, tenant)
            choices = model_choices(console, tenant)
        return render(request, "playground.html", tenant=tenant, tenants=tenants,
                      choices=choices, max_tokens=MAX_PLAYGROUND_TOKENS)

    @router.post("/chat")
    async def chat(request: Request, session: Signed):
        """SSE chunks as /v1/chat/completions streams them; errors as its JSON bodies."""
        check_csrf(request, session)
        try:
            ask = PlaygroundAsk.model_validate_json(await request.body())
            tenant_scope(console, session, ask.tenant)
            body = ChatCompletionRequest(model=ask.model, messages=ask.messages, stream=True,
                                         max_tokens=ask.max_tokens,
                                         temperature=ask.temperature)
            console.serving.has_capacity()
            return await console.chat(body, request,
                                      acting_principal(console, session, ask.tenant))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            error = OpenAIError(400, f"{where}: {first['msg']}")
        except OpenAIError as e:
            error = e
        return JSONResponse(error.body(), status_code=error.status)

    return router
