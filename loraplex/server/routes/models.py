"""GET /v1/models: the adapters a tenant's key may name (and the base model, if allowed)."""

from typing import Annotated

from fastapi import APIRouter, Depends

from loraplex.registry.tenants import Principal
from loraplex.server.serving import Serving


def models_router(serving: Serving) -> APIRouter:
    router = APIRouter()
    Tenant = Annotated[Principal, Depends(serving.authenticate)]

    @router.get("/v1/models")
    async def list_models(principal: Tenant):
        registry = serving.registry
        names = [a.name for a in registry.list_adapters(principal.tenant_name)]
        if registry.tenant_may_use_base(principal.tenant_id):
            names.insert(0, serving.settings.base_model_name)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": principal.tenant_name}
            for name in names]}

    return router
