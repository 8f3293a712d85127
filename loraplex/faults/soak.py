"""Soak: many tenants, many requests, clients hanging up, deployments changing under load; not
one answer lost or given by the wrong version, memory flat, the engine idle at the end.

1. References: each tenant's v1 and v2, pinned by name (`bot:v1`), answer every prompt on both
   endpoints once (greedy, max_tokens tokens). The two versions must answer differently for
   most prompts, or a mis-attributed answer could pass unseen; the run reports how many do.
2. The soak: `num_requests` requests to the plain name `bot` from `concurrency` clients at
   once: a random tenant, prompt, endpoint, length (1..MAX_TOKENS), streamed or not; a share
   of the streamed ones hang up after a chunk or three. Meanwhile one tenant at a time is
   promoted to v2 or rolled back to v1, every `change_every_s`.
3. Every answer that was not hung up on must be a 200, whole, of exactly its length, carry a
   version header the tenant's deployment had while the request ran, and its tokens must be
   that version's reference answer cut to its length (greedy: same prompt and version -> same
   tokens, whatever the batch). Anything else counts as lost (no whole answer) or
   mis-attributed (a wrong version or wrong tokens).
4. The server's RSS is sampled throughout; its growth from the end of the references (every
   adapter loaded once, the engine warm) to the end must stay under RSS_BOUND_BYTES. At the end
   the engine must return to idle: nothing running or waiting, every KV block free, no load
   pending.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from loraplex.faults.client import ENDPOINTS, Answer, ask
from loraplex.faults.harness import (
    ADAPTER,
    FaultHome,
    ServeProcess,
    admin_headers,
    is_idle,
    make_home,
    wait_idle,
)

MAX_TOKENS = 24
PROMPTS = (
    "Hi!",
    "When does the clinic open tomorrow?",
    "Summarise the contract: the party of the first part agrees to deliver the goods by the "
    "end of the month, and the party of the second part agrees to pay on delivery.",
)
# RSS may grow this much after warm-up (allocator slack, metrics series, the prefix cache's
# bookkeeping); a leak per request (a stream, a sequence, a KV block table) exceeds it.
RSS_BOUND_BYTES = 64 << 20
# Fewer slots and host-cache places than tenants' versions, so adapters keep moving.
SERVE_ARGS = ("--max-loras", "4", "--max-cpu-loras", "8", "--max-num-seqs", "32",
              "--kv-cache", "32MiB", "--prewarm", "none")


@dataclass
class SoakReport:
    tenants: int
    requests: int
    reference_requests: int
    streamed: int = 0
    hung_up: int = 0
    checked: int = 0  # answers compared with their version's reference
    lost: int = 0
    misattributed: int = 0
    promotions: int = 0
    rollbacks: int = 0
    distinguishable: float = 0.0  # share of (tenant, prompt, endpoint) where v1 != v2
    rss_warm_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_max_mib: float = 0.0
    rss_bound_mib: float = RSS_BOUND_BYTES / 2**20
    engine_idle: bool = False
    engine_end: dict = field(default_factory=dict)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # the first few, for the report

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.misattributed == 0 and self.engine_idle
                and self.rss_end_mib - self.rss_warm_mib <= self.rss_bound_mib
                and self.distinguishable >= 0.5)

    def as_dict(self) -> dict:
        return {**asdict(self), "rss_growth_mib": self.rss_end_mib - self.rss_warm_mib,
                "ok": self.ok}


@dataclass
class Deployments:
    """Which version each tenant's `bot` serves, and when it changed (call start, call end)."""

    changes: dict[str, list[tuple[float, float, str]]]

    def allowed(self, tenant: str, start: float, end: float) -> set[str]:
        """Versions the tenant's deployment had at some moment while a request ran."""
        versions, before = set(), "v1"
        for t0, t1, version in self.changes[tenant]:
            if t1 <= start:
                before = version
            elif t0 <= end:
                versions.add(version)  # changed while the request ran (or its call did)
        return versions | {before}


async def _references(client, url, fh: FaultHome, concurrency: int) -> dict:
    """(tenant, version, endpoint, prompt) -> tokens, each version pinned by name."""
    gate = asyncio.Semaphore(concurrency)
    refs = {}

    async def one(tenant, number, endpoint, prompt):
        async with gate:
            answer = await ask(client, url, fh.keys[tenant], endpoint, f"{ADAPTER}:v{number}",
                               prompt, MAX_TOKENS, stream=False)
        if answer.status != 200 or answer.version != f"v{number}" or \
                len(answer.tokens) != MAX_TOKENS:
            raise RuntimeError(f"reference {tenant} v{number} {endpoint}: {answer}")
        refs[(tenant, f"v{number}", endpoint, prompt)] = answer.tokens

    await asyncio.gather(*(one(t, n, e, p) for t in fh.tenants for n in (1, 2)
                           for e in ENDPOINTS for p in PROMPTS))
    return refs


async def _change_deployments(client, url, fh: FaultHome, rng: random.Random,
                              every_s: float, stop: asyncio.Event, report: SoakReport,
                              deployments: Deployments, serving: dict[str, str]) -> None:
    """Promote v2 or roll back to v1, one random tenant at a time, until `stop`."""
    while not stop.is_set():
        await asyncio.sleep(every_s)
        tenant = rng.choice(fh.tenants)
        base = f"{url}/admin/tenants/{tenant}/adapters/{ADAPTER}"
        start = time.monotonic()
        if serving[tenant] == "v1":
            response = await client.post(f"{base}/promote", json={"version": 2},
                                         headers=admin_headers(fh))
            new, counter = "v2", "promotions"
        else:
            response = await client.post(f"{base}/rollback", headers=admin_headers(fh))
            new, counter = "v1", "rollbacks"
        if response.status_code != 200:
            raise RuntimeError(f"{counter} of {tenant}: {response.status_code} {response.text}")
        deployments.changes[tenant].append((start, time.monotonic(), new))
        serving[tenant] = new
        setattr(report, counter, getattr(report, counter) + 1)


def _check(answer: Answer, spec: dict, start: float, end: float, refs: dict,
           deployments: Deployments, report: SoakReport) -> None:
    if spec["hang_up_after"] is not None:
        report.hung_up += 1
        if answer.status != 200 or answer.error:
            report.lost += 1
            report.failures.append(f"hung-up request failed first: {answer}")
        return
    where = f"{spec['tenant']} {spec['endpoint']} max_tokens={spec['max_tokens']}"
    if answer.status != 200 or answer.error or not answer.is_whole or \
            len(answer.tokens) != spec["max_tokens"]:
        report.lost += 1
        report.failures.append(f"lost: {where}: {answer}")
        return
    report.checked += 1
    allowed = deployments.allowed(spec["tenant"], start, end)
    ref = refs.get((spec["tenant"], answer.version, spec["endpoint"], spec["prompt"]))
    if answer.version not in allowed or ref is None or \
            answer.tokens != ref[:spec["max_tokens"]]:
        report.misattributed += 1
        report.failures.append(f"mis-attributed: {where}: version {answer.version} "
                               f"(allowed {sorted(allowed)}), tokens {answer.tokens[:6]}...")


def _specs(fh: FaultHome, num_requests: int, rng: random.Random,
           hang_up_share: float) -> list[dict]:
    specs = []
    for _ in range(num_requests):
        stream = rng.random() < 0.5
        max_tokens = rng.randint(1, MAX_TOKENS)
        hang_up = stream and max_tokens > 4 and rng.random() < hang_up_share
        specs.append({"tenant": rng.choice(fh.tenants), "endpoint": rng.choice(ENDPOINTS),
                      "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens,
                      "stream": stream, "hang_up_after": rng.randint(1, 3) if hang_up else None})
    return specs


async def _soak(server: ServeProcess, fh: FaultHome, num_requests: int, concurrency: int,
                seed: int, change_every_s: float, hang_up_share: float) -> SoakReport:
    url, rng = server.url, random.Random(seed)
    report = SoakReport(len(fh.tenants), num_requests,
                        len(fh.tenants) * 2 * len(ENDPOINTS) * len(PROMPTS))
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        refs = await _references(client, url, fh, concurrency)
        pairs = {(t, e, p) for t, _, e, p in refs}
        report.distinguishable = sum(refs[(t, "v1", e, p)] != refs[(t, "v2", e, p)]
                                     for t, e, p in pairs) / len(pairs)
        rss = [server.rss_bytes()]
        report.rss_warm_mib = rss[0] / 2**20
        deployments = Deployments({t: [] for t in fh.tenants})
        serving = dict.fromkeys(fh.tenants, "v1")
        queue = _specs(fh, num_requests, rng, hang_up_share)
        report.streamed = sum(s["stream"] for s in queue)
        stop = asyncio.Event()

        async def worker():
            while queue:
                spec = queue.pop()
                start = time.monotonic()
                answer = await ask(client, url, fh.keys[spec["tenant"]], spec["endpoint"],
                                   ADAPTER, spec["prompt"], spec["max_tokens"], spec["stream"],
                                   spec["hang_up_after"])
                _check(answer, spec, start, time.monotonic(), refs, deployments, report)

        async def sample_rss():
            while not stop.is_set():
                await asyncio.sleep(0.5)
                rss.append(server.rss_bytes())

        background = [asyncio.create_task(_change_deployments(
            client, url, fh, rng, change_every_s, stop, report, deployments, serving)),
            asyncio.create_task(sample_rss())]
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            stop.set()
            await asyncio.gather(*background)
    stats = await asyncio.to_thread(wait_idle, url, fh)
    report.engine_idle, report.engine_end = is_idle(stats), stats
    rss.append(server.rss_bytes())
    report.rss_end_mib, report.rss_max_mib = rss[-1] / 2**20, max(rss) / 2**20
    del report.failures[10:]
    return report


def run_soak(root: Path, *, num_requests: int, num_tenants: int = 16, concurrency: int = 32,
             seed: int = 0, change_every_s: float = 0.5, hang_up_share: float = 0.1,
             model_dir: Path | None = None) -> SoakReport:
    """The whole soak in a fresh home under `root`."""
    started = time.monotonic()
    fh = make_home(root, num_tenants, model_dir)
    with ServeProcess(fh, *SERVE_ARGS) as server:
        report = asyncio.run(_soak(server, fh, num_requests, concurrency, seed, change_every_s,
                                   hang_up_share))
    report.seconds = round(time.monotonic() - started, 1)
    return report
