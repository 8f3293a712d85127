"""/v1/webhook_endpoints: OpenAI's webhook endpoints API (create, list, retrieve, update,
delete, rotate_secret, test) for a tenant's key; deliveries are loraplex/webhooks.py's.

The signing secret is shown once, when the endpoint is created or its secret rotated; later
reads show a hint of it. Only the fine-tuning events exist here, so only they may be asked for.
"""

import asyncio
import functools
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from loraplex.registry import InvalidInput
from loraplex.registry.fine_tuning import FineTuningStore
from loraplex.registry.tenants import Principal
from loraplex.server.protocol import OpenAIError, refuse_unknown_query
from loraplex.server.serving import Serving
from loraplex.webhooks import (
    EVENT_TYPES,
    WebhookError,
    WebhookSender,
    check_url,
    new_secret,
    secret_hint,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateEndpoint(_Strict):
    name: str = Field(min_length=1, max_length=256)
    url: str = Field(min_length=1, max_length=2048)
    event_types: list[str] = Field(min_length=1, max_length=len(EVENT_TYPES))


class UpdateEndpoint(_Strict):
    name: str | None = Field(default=None, min_length=1, max_length=256)
    url: str | None = Field(default=None, min_length=1, max_length=2048)
    event_types: list[str] | None = Field(default=None, min_length=1,
                                          max_length=len(EVENT_TYPES))


class RotateSecret(_Strict):
    keep_old_secret_active_for_24_hours: bool = False


class TestEndpoint(_Strict):
    event_type: str


def webhooks_router(serving: Serving, store: FineTuningStore, sender: WebhookSender
                    ) -> APIRouter:
    router = APIRouter(prefix="/v1/webhook_endpoints")
    Tenant = Annotated[Principal, Depends(serving.authenticate)]

    def check(url: str | None, event_types: list[str] | None) -> None:
        unknown = sorted(set(event_types or ()) - set(EVENT_TYPES))
        if unknown:
            raise OpenAIError(400, f"event_types: {', '.join(unknown)} never happen on this "
                              f"server; it sends {', '.join(EVENT_TYPES)}", param="event_types")
        if url is not None:
            try:
                check_url(url, allow_private=sender.allow_private)
            except WebhookError as e:
                raise OpenAIError(400, str(e), param="url") from None

    def found(principal, endpoint_id: str) -> dict:
        endpoint = store.get_endpoint(principal.tenant_id, endpoint_id)
        if endpoint is None:
            raise OpenAIError(404, f"No webhook endpoint found with id {endpoint_id!r}",
                              param="webhook_endpoint_id")
        return endpoint

    @router.post("")
    async def create(body: CreateEndpoint, principal: Tenant):
        check(body.url, body.event_types)
        secret, now = new_secret(), int(time.time())
        endpoint = {"id": f"we_{secrets.token_hex(12)}", "object": "webhook_endpoint",
                    "created_at": now, "updated_at": now, "name": body.name, "url": body.url,
                    "event_types": sorted(set(body.event_types)),
                    "signing_secret_hint": secret_hint(secret)}
        store.add_endpoint(principal.tenant_id, endpoint, secret,
                           actor=f"key:{principal.key_id}")
        return {**endpoint, "signing_secret": secret}

    @router.get("")
    async def list_endpoints(request: Request, principal: Tenant, after: str | None = None,
                             limit: Annotated[int, Query(ge=1, le=100)] = 20):
        refuse_unknown_query(request, ("after", "limit"))
        try:
            items, has_more = store.list_endpoints(principal.tenant_id, after, limit)
        except InvalidInput as e:
            raise OpenAIError(400, str(e), param="after") from None
        return {"object": "list", "data": items, "has_more": has_more,
                "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None}

    @router.get("/{endpoint_id}")
    async def retrieve(endpoint_id: str, principal: Tenant):
        return found(principal, endpoint_id)

    @router.post("/{endpoint_id}")
    async def update(endpoint_id: str, body: UpdateEndpoint, principal: Tenant):
        endpoint = found(principal, endpoint_id)
        check(body.url, body.event_types)
        changes = body.model_dump(exclude_none=True)
        if "event_types" in changes:
            changes["event_types"] = sorted(set(changes["event_types"]))
        if any(endpoint[k] != v for k, v in changes.items()):
            endpoint = {**endpoint, **changes, "updated_at": int(time.time())}
            store.save_endpoint(principal.tenant_id, endpoint, actor=f"key:{principal.key_id}")
        return endpoint

    @router.delete("/{endpoint_id}")
    async def delete(endpoint_id: str, principal: Tenant):
        found(principal, endpoint_id)
        store.delete_endpoint(principal.tenant_id, endpoint_id, actor=f"key:{principal.key_id}")
        return {"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}

    @router.post("/{endpoint_id}/rotate_secret")
    async def rotate_secret(endpoint_id: str, principal: Tenant,
                            body: RotateSecret | None = None):
        secret, now = new_secret(), int(time.time())
        endpoint = {**found(principal, endpoint_id), "updated_at": now,
                    "signing_secret_hint": secret_hint(secret)}
        keep = body is not None and body.keep_old_secret_active_for_24_hours
        store.save_endpoint(principal.tenant_id, endpoint, actor=f"key:{principal.key_id}",
                            secret=secret, previous_expires_at=now + 86_400 if keep else None)
        return {**endpoint, "signing_secret": secret}

    @router.post("/{endpoint_id}/test")
    async def test(endpoint_id: str, body: TestEndpoint, principal: Tenant):
        endpoint = found(principal, endpoint_id)
        check(None, [body.event_type])
        # Audited whatever the outcome: it makes the server call out to a tenant's URL.
        audit = functools.partial(serving.registry.record_audit, f"key:{principal.key_id}",
                                  "webhook.test", endpoint_id, tenant=principal.tenant_name)
        try:
            status = await asyncio.to_thread(sender.send_test, principal.tenant_id, endpoint,
                                             body.event_type)
        except WebhookError as e:
            audit({"event_type": body.event_type, "error": str(e)})
            raise OpenAIError(400, str(e), param="url") from None
        audit({"event_type": body.event_type, "status_code": status})
        return {"object": "webhook_endpoint.test", "event_type": body.event_type,
                "status_code": status, "success": True, "webhook_endpoint_id": endpoint_id}

    return router
