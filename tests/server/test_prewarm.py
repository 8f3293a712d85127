"""Adapters loaded before traffic: at start the most recently used, and on publish, promote
and split the versions about to serve."""

import asyncio

import httpx

from loraplex.registry.ledger import UsageKey
from loraplex.server.prewarm import prewarm_at_start
from loraplex.vault.artifacts import ArtifactSealer


def host_cache(live) -> set[int]:
    stats = httpx.get(f"{live.url}/admin/engine",
                      headers={"Authorization": f"Bearer {live.admin_key}"}).json()
    return set(stats["adapters_in_host_cache"])


def version_id(live, tenant, name, number) -> int:
    return live.registry.get_version(tenant, name, number).id


def test_promote_and_split_load_the_version_before_traffic_moves(live):
    admin = {"Authorization": f"Bearer {live.admin_key}"}
    v2 = version_id(live, "acme", "support", 2)
    assert v2 not in host_cache(live)  # nothing asked for it yet
    response = httpx.post(f"{live.url}/admin/tenants/acme/adapters/support/promote",
                          json={"version": 2}, headers=admin)
    assert response.status_code == 200, response.text
    assert v2 in host_cache(live)
    sales = version_id(live, "acme", "sales", 1)
    assert sales not in host_cache(live)
    response = httpx.put(f"{live.url}/admin/tenants/acme/adapters/sales/split",
                         json={"split": {"v1": 100}}, headers=admin)
    assert response.status_code == 200, response.text
    assert sales in host_cache(live)
    # A version that does not exist is the registry's 4xx, as before, not a load error.
    response = httpx.put(f"{live.url}/admin/tenants/acme/adapters/sales/split",
                         json={"split": {"v9": 100}}, headers=admin)
    assert 400 <= response.status_code < 500


def test_at_start_the_most_recently_used_adapters_are_loaded(live):
    registry = live.registry
    acme, globex = registry.get_tenant("acme").id, registry.get_tenant("globex").id
    counts = (1, 0, 10, 5, 0)
    registry.add_usage({UsageKey(globex, "k", "bot", "v1", "2026-12-03T09:00"): counts,
                        UsageKey(acme, "k", "support", "v1", "2026-12-02T09:00"): counts,
                        UsageKey(acme, "k", "tiny-base", "base", "2026-12-03T10:00"): counts})
    assert registry.recently_used_adapters(10) == [("globex", "bot"), ("acme", "support")]
    engine = live.engine
    sealer = ArtifactSealer.for_home(live.home)

    async def warm(limit):
        return await prewarm_at_start(engine, registry, sealer, limit)

    assert asyncio.run(warm(0)) == []
    assert asyncio.run(warm(1)) == ["globex/bot:v1"]
    served = [f"acme/support:v{n}" for n, w in registry.show_adapter(
        "acme", "support").split.items() if w > 0]
    assert asyncio.run(warm(None)) == ["globex/bot:v1", *served]
    assert version_id(live, "globex", "bot", 1) in host_cache(live)
