"""Adapters loaded before traffic needs them, so that no request pays a disk read or the
conversion to the serving form (lora/packed.py).

- At start (`ServerSettings.prewarm_adapters`): the versions that serve the adapters used most
  recently (by the ledger), as many as the engine's host cache holds.
- On publish (an upload, a fine-tuning job) the new version; on promote and split, every version
  that is to get traffic, before the registry moves it: a version that cannot be loaded is then
  refused before any user is sent to it.

Loading runs on the engine's loader thread while the engine keeps stepping (AsyncEngine.prewarm).
"""

import logging

from loraplex.engine.async_engine import AsyncEngine
from loraplex.registry import NotFound, Registry
from loraplex.server.protocol import OpenAIError
from loraplex.server.serving import adapter_request
from loraplex.vault.artifacts import ArtifactSealer

log = logging.getLogger(__name__)


async def warm_versions(engine: AsyncEngine, registry: Registry, sealer: ArtifactSealer,
                        tenant: str, name: str, numbers) -> None:
    """Load these versions of the tenant's adapter into host memory; raises the engine's
    ValueError (AdapterError) for one that cannot be loaded."""
    tenant_id = registry.get_tenant(tenant).id
    for number in numbers:
        found = registry.resolve(tenant_id, f"{name}:v{number}", "")
        await engine.prewarm(adapter_request(sealer, tenant, found.version_id,
                                             found.artifact_path))


async def warm_before_traffic(engine: AsyncEngine, registry: Registry, sealer: ArtifactSealer,
                              tenant: str, name: str, numbers) -> None:
    """Load versions before traffic moves to them (promote, split: the admin API's and the
    console's); one that cannot be loaded is a 400, and no traffic moves."""
    try:
        await warm_versions(engine, registry, sealer, tenant, name, numbers)
    except NotFound:
        pass  # a version that does not exist: the registry's own answer says so
    except ValueError as e:
        raise OpenAIError(400, f"cannot load it, so no traffic was moved: {e}") from None


async def warm_or_log(engine: AsyncEngine, registry: Registry, sealer: ArtifactSealer,
                      tenant: str, name: str, number: int) -> None:
    """Warm a version just published; one that fails is logged (stored and validated: its own
    requests will say why)."""
    try:
        await warm_versions(engine, registry, sealer, tenant, name, [number])
    except ValueError as e:
        log.warning("pre-warm of %s/%s:v%d failed: %s", tenant, name, number, e)


async def prewarm_serving(engine: AsyncEngine, registry: Registry, sealer: ArtifactSealer,
                          tenant: str, name: str, pin: bool, actor: str) -> int:
    """Load the adapter's active version ahead of traffic (pinned: it keeps a slot for good);
    returns its number. Audited: a pin is a change to the engine an operator must trace."""
    found = registry.resolve(registry.get_tenant(tenant).id, name, "")
    try:
        await engine.prewarm(adapter_request(sealer, tenant, found.version_id,
                                             found.artifact_path), pin)
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None
    registry.record_audit(actor, "adapter.prewarm", f"{tenant}/{name}",
                          {"version": f"v{found.number}", "pinned": pin}, tenant=tenant)
    return found.number


async def prewarm_at_start(engine: AsyncEngine, registry: Registry, sealer: ArtifactSealer,
                           limit: int | None) -> list[str]:
    """Warm the serving versions of the most recently used adapters, at most `limit` (None: as
    many as the host cache holds) versions; returns "tenant/adapter:vN" of each. A version that
    fails to load, for whatever reason, is logged and skipped: its own requests will report
    why, and the server starts all the same."""
    room = engine.engine.config.max_cpu_loras
    limit = room if limit is None else min(limit, room)
    warmed = []
    for tenant, name in registry.recently_used_adapters(limit) if limit > 0 else ():
        try:
            numbers = [n for n, weight in registry.show_adapter(tenant, name).split.items()
                       if weight > 0]
        except NotFound:  # deleted since it served
            continue
        for number in numbers[:limit - len(warmed)]:
            try:
                await warm_versions(engine, registry, sealer, tenant, name, [number])
            except Exception as e:  # noqa: BLE001 - a start-up nicety never stops the server
                log.warning("pre-warm of %s/%s:v%d skipped: %s", tenant, name, number, e)
                continue
            warmed.append(f"{tenant}/{name}:v{number}")
    return warmed
