"""Administration over HTTP under /admin/ (admin key only): the same operations as the CLI."""

import asyncio
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from loraplex.registry import InvalidInput, Registry
from loraplex.registry.tenants import DEFAULT_ROTATION_OVERLAP_S, MAX_ROTATION_OVERLAP_S
from loraplex.server.auth import Authenticator
from loraplex.server.openapi import linked
from loraplex.server.prewarm import prewarm_serving, warm_before_traffic, warm_or_log
from loraplex.server.protocol import OpenAIError
from loraplex.vault.artifacts import ArtifactSealer

UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors")
# A created tenant's name, a created (or rotated-in) key's id: what the schema's links pass on.
TENANT_LINKS = linked(200, {"tenant": "$response.body#/name"},
                      "POST /admin/tenants/{tenant}/keys", "GET /admin/tenants/{tenant}/quota",
                      "PATCH /admin/tenants/{tenant}/quota", "GET /admin/tenants/{tenant}/adapters",
                      "DELETE /admin/tenants/{tenant}/vault")
KEY_LINKS = linked(200, {"key_id": "$response.body#/key_id"},
                   "DELETE /admin/keys/{key_id}", "POST /admin/keys/{key_id}/rotate")
# After a change to an adapter's split, the operations on the same adapter.
ADAPTER_LINKS = linked(200, {"tenant": "$request.path.tenant", "name": "$request.path.name"},
                       *(f"{method} /admin/tenants/{{tenant}}/adapters/{{name}}{operation}"
                         for method, operation in (("GET", ""), ("GET", "/stats"),
                                                   ("POST", "/promote"), ("POST", "/rollback"),
                                                   ("PUT", "/split"), ("POST", "/prewarm"))))


class TenantBody(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    allow_base_model: bool = False


class PromoteBody(BaseModel):
    # strict: JSON true is not version 1 (pydantic's lax mode would promote v1 for it).
    version: int = Field(ge=1, strict=True)


class QuotaBody(BaseModel):
    """The fields to change: a field left out stays as it is; null lifts a limit."""

    model_config = ConfigDict(extra="forbid")
    tier: float | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    monthly_tokens: int | None = None


class RotateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_seconds: int = Field(default=DEFAULT_ROTATION_OVERLAP_S, ge=0,
                                 le=MAX_ROTATION_OVERLAP_S)
    """How long the old key keeps working beside the new one (0: it stops now)."""


def rotated_json(new_id: str, key: str, old) -> dict:
    return {"key_id": new_id, "key": key, "note": "shown once; store it now",
            "replaces": old.key_id, "old_key_expires_at": old.expires_at}


class SplitBody(BaseModel):
    split: dict[str, int]  # {"v1": 90, "v2": 10}


def parse_split(spec: dict[str, int]) -> dict[int, int]:
    """{"v1": 90, "2": 10} -> {1: 90, 2: 10}, with a clear error for anything else."""
    split = {}
    for version, weight in spec.items():
        number = version.removeprefix("v")
        if not number.isdigit():
            raise InvalidInput(f"version {version!r} should look like v1")
        split[int(number)] = weight
    return split


def admin_router(registry: Registry, engine, ledger, sealer: ArtifactSealer,
                 auth: Authenticator, validate=None) -> APIRouter:
    """`validate` checks an uploaded adapter against the base model (see validation.py);
    `ledger` is the server's LedgerWriter, flushed before usage is read; `sealer` encrypts
    pushed adapters under their tenant's vault key and reads them back."""
    router = APIRouter(prefix="/admin")

    def actor(request: Request) -> str:
        return f"admin-key:{auth.admin(request).key_id}"

    @router.post("/tenants", responses=TENANT_LINKS)
    async def create_tenant(body: TenantBody, request: Request):
        who = actor(request)
        tenant = registry.create_tenant(body.name, actor=who)
        if body.allow_base_model:
            registry.set_base_model_access(body.name, True, actor=who)
        return asdict(tenant)

    @router.get("/tenants")
    async def list_tenants(request: Request):
        actor(request)
        return {"tenants": [asdict(t) for t in registry.list_tenants()]}

    @router.post("/tenants/{tenant}/keys", responses=KEY_LINKS)
    async def create_key(tenant: str, request: Request):
        key_id, key = registry.create_key(tenant, actor=actor(request))
        return {"key_id": key_id, "key": key, "note": "shown once; store it now"}

    @router.delete("/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request):
        registry.revoke_key(key_id, actor=actor(request))
        return {"revoked": key_id}

    @router.post("/keys/{key_id}/rotate", responses=KEY_LINKS)
    async def rotate_key(key_id: str, request: Request, body: RotateBody | None = None):
        """A tenant's or an admin key: the new key now, the old one expires after the overlap."""
        overlap = (body or RotateBody()).overlap_seconds
        new_id, key, old = registry.rotate_key(key_id, actor=actor(request), overlap_s=overlap)
        return rotated_json(new_id, key, old)

    async def warm(tenant: str, name: str, numbers) -> None:
        await warm_before_traffic(engine, registry, sealer, tenant, name, numbers)

    @router.post("/tenants/{tenant}/adapters/{name}/versions")
    async def push_version(tenant: str, name: str, request: Request, promote: bool = False):
        """Multipart upload of adapter_config.json and adapter_model.safetensors."""
        who = actor(request)
        form = await request.form()
        with tempfile.TemporaryDirectory(prefix="loraplex-upload-") as tmp:
            for field in UPLOAD_FILES:
                upload = form.get(field)
                if not isinstance(upload, UploadFile):
                    raise OpenAIError(400, f"missing file field {field!r}", param=field)
                with open(Path(tmp) / field, "wb") as out:
                    shutil.copyfileobj(upload.file, out)
            version = await asyncio.to_thread(
                registry.push_version, tenant, name, Path(tmp), actor=who, validate=validate,
                sealer=sealer, promote=promote)
        # The serving form is written now, on publish, not by the version's first request.
        await warm_or_log(engine, registry, sealer, tenant, name, version.number)
        return _version_json(version)

    @router.get("/tenants/{tenant}/adapters")
    async def list_adapters(tenant: str, request: Request):
        actor(request)
        adapters = registry.list_adapters(tenant)
        return {"adapters": [_adapter_json(a) for a in adapters]}

    @router.get("/tenants/{tenant}/adapters/{name}")
    async def show_adapter(tenant: str, name: str, request: Request):
        actor(request)
        return _adapter_json(registry.show_adapter(tenant, name))

    @router.post("/tenants/{tenant}/adapters/{name}/promote", responses=ADAPTER_LINKS)
    async def promote(tenant: str, name: str, body: PromoteBody, request: Request):
        await warm(tenant, name, [body.version])  # before any traffic moves to it
        split = registry.promote(tenant, name, body.version, actor=actor(request))
        return {"split": _split_json(split)}

    @router.post("/tenants/{tenant}/adapters/{name}/rollback", responses=ADAPTER_LINKS)
    async def rollback(tenant: str, name: str, request: Request):
        return {"split": _split_json(registry.rollback(tenant, name, actor=actor(request)))}

    @router.put("/tenants/{tenant}/adapters/{name}/split", responses=ADAPTER_LINKS)
    async def split(tenant: str, name: str, body: SplitBody, request: Request):
        who = actor(request)
        parsed = parse_split(body.split)
        await warm(tenant, name, [number for number, weight in parsed.items() if weight > 0])
        return {"split": _split_json(registry.split(tenant, name, parsed, actor=who))}

    @router.get("/tenants/{tenant}/adapters/{name}/stats")
    async def stats(tenant: str, name: str, request: Request):
        actor(request)
        return {"versions": registry.version_stats(tenant, name)}

    @router.get("/tenants/{tenant}/quota")
    async def get_quota(tenant: str, request: Request):
        actor(request)
        return asdict(registry.get_quota(tenant))

    @router.patch("/tenants/{tenant}/quota")
    async def set_quota(tenant: str, body: QuotaBody, request: Request):
        quota = registry.set_quota(tenant, actor=actor(request),
                                   **body.model_dump(exclude_unset=True))
        return asdict(quota)

    @router.get("/usage")
    async def usage(request: Request, tenant: str | None = None,
                    start: str | None = Query(None, alias="from"),
                    end: str | None = Query(None, alias="to"), group_by: str = "day"):
        """Every tenant's usage (or one's), each row with its tenant; see usage_rows."""
        actor(request)
        names = [tenant] if tenant is not None else [t.name for t in registry.list_tenants()]
        return await usage_report(registry, ledger, names, start, end, group_by)

    @router.post("/tenants/{tenant}/adapters/{name}/prewarm")
    async def prewarm(tenant: str, name: str, request: Request, pin: bool = False):
        """Load the adapter's active version into memory ahead of traffic (optionally pinned)."""
        number = await prewarm_serving(engine, registry, sealer, tenant, name, pin,
                                       actor(request))
        return {"prewarmed": f"{name} v{number}", "pinned": pin}

    @router.delete("/tenants/{tenant}/vault")
    async def shred_tenant(tenant: str, request: Request):
        """Crypto-shred the tenant: its vault key, datasets, adapter artifacts and serving-cache
        entries (Vault.delete_tenant_vault); its versions stop resolving."""
        who = actor(request)
        version_ids = {v.id for info in registry.list_adapters(tenant) for v in info.versions}
        await asyncio.to_thread(sealer.vault.delete_tenant_vault, tenant, actor=who)
        if hasattr(engine, "evict_adapters"):  # local; Ray replicas' host caches age out (LRU)
            await engine.evict_adapters(version_ids)
        return {"shredded": tenant}

    @router.get("/audit")
    async def audit(request: Request, limit: int = 100, tenant: str | None = None):
        actor(request)
        entries = registry.audit_log(limit=limit, tenant=tenant)
        return {"entries": [asdict(e) for e in entries]}

    @router.get("/engine")
    async def engine_stats(request: Request):
        actor(request)
        return await engine.stats()

    return router


async def usage_report(registry: Registry, ledger, tenants: list[str], start: str | None,
                       end: str | None, group_by: str) -> dict:
    """The ledger's rows of `tenants` for hours [start, end), grouped, each with its tenant.
    What finished so far is committed first, so every answered request is in it."""
    await asyncio.to_thread(ledger.flush)
    rows = []
    for tenant in tenants:
        rows += [{"tenant": tenant} | row for row in await asyncio.to_thread(
            registry.usage, tenant, start=start, end=end, group_by=group_by)]
    return {"group_by": group_by, "from": start, "to": end, "data": rows}


def _split_json(split: dict[int, int]) -> dict[str, int]:
    return {f"v{number}": weight for number, weight in split.items()}


def _version_json(version) -> dict:
    data = asdict(version)
    data["artifact_path"] = str(data["artifact_path"])
    data["label"] = version.label
    return data


def _adapter_json(info) -> dict:
    return {"name": info.name, "created_at": info.created_at, "active": info.active,
            "split": _split_json(info.split),
            "versions": [_version_json(v) for v in info.versions]}
