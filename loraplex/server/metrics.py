"""Prometheus metrics: per-tenant and per-version request series, and the engine's state."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LABELS = ("tenant", "adapter", "version")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests", "Finished requests", LABELS + ("status",),
                                registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens", LABELS,
                                     registry=r)
        self.completion_tokens = Counter("loraplex_completion_tokens", "Generated tokens",
                                         LABELS, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to first token",
                              LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("loraplex_request_latency_seconds", "Request latency",
                                 LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("loraplex_queue_time_seconds", "Time from arrival in the "
                                    "engine to first admission", LABELS,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("loraplex_rejected_requests", "Requests refused before running "
                                "(reason: the limit, e.g. tokens_per_minute)", ("reason",),
                                registry=r)
        self.virtual_tokens = Gauge("loraplex_tenant_virtual_tokens", "A busy tenant's virtual "
                                    "token counter (weighted service received)", ("tenant",),
                                    registry=r)
        self.tenant_sequences = Gauge("loraplex_tenant_sequences", "A busy tenant's sequences in "
                                      "the engine", ("tenant", "state"), registry=r)
        self.prefix_cache_tokens = Gauge(
            "loraplex_tenant_prefix_cache_tokens", "A tenant's prompt tokens looked up in the "
            "prefix cache on admission (kind=queried) and found there, not computed (kind=hit)",
            ("tenant", "kind"), registry=r)
        self.engine = {
            name: Gauge(f"loraplex_engine_{name}", help_text, registry=r)
            for name, help_text in {
                "running": "Sequences in the running batch",
                "waiting": "Sequences waiting to run",
                "kv_blocks_total": "KV cache blocks",
                "kv_blocks_free": "Free KV cache blocks (with the cached ones no sequence holds)",
                "preemptions": "Sequences preempted so far",
                "fairness_preemptions": "Sequences preempted to free a seat for a tenant below "
                                        "its fair share",
                "slot_hits": "Adapter requests that found their adapter in a slot",
                "slot_misses": "Adapter activations into a slot",
                "host_misses": "Adapter loads from disk",
                "adapters_in_slots_count": "Adapters resident in device slots",
                "adapters_in_host_cache_count": "Adapters in the host cache",
                "adapter_load_ms_p50": "Median adapter load time from disk (ms)",
                "tokens_per_second": "Generated tokens per second (last 10 s)",
                "prefix_cache_blocks": "KV cache blocks the prefix cache can find (held or free)",
                "return_window_waits": "Pauses before a step for the next requests of clients "
                                       "that answer at once (engine/return_window.py)",
                "return_window_waited_ms": "Milliseconds spent in those pauses",
            }.items()
        }

    def observe_request(self, labels: tuple[str, str, str], status: str, prompt_tokens: int,
                        completion_tokens: int, ttft: float | None, latency: float,
                        queue_time: float | None = None) -> None:
        self.requests.labels(*labels, status).inc()
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.completion_tokens.labels(*labels).inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(*labels).observe(ttft)
        self.latency.labels(*labels).observe(latency)
        if queue_time is not None:
            self.queue_time.labels(*labels).observe(queue_time)

    def render(self, engine_stats: dict) -> bytes:
        stats = dict(engine_stats)
        stats["adapters_in_slots_count"] = len(stats.get("adapters_in_slots", []))
        stats["adapters_in_host_cache_count"] = len(stats.get("adapters_in_host_cache", []))
        for name, gauge in self.engine.items():
            value = stats.get(name)
            gauge.set(value if isinstance(value, int | float) else 0)
        # Only tenants with work now: an idle tenant's series go away rather than go stale.
        self.virtual_tokens.clear()
        self.tenant_sequences.clear()
        for tenant, share in stats.get("fairness", {}).items():
            self.virtual_tokens.labels(tenant).set(share["counter"])
            running = share.get("running", 0)
            self.tenant_sequences.labels(tenant, "running").set(running)
            self.tenant_sequences.labels(tenant, "waiting").set(share["sequences"] - running)
        # Counts since the engine started, kept for every tenant that has sent a request.
        for tenant, counts in stats.get("prefix_cache", {}).items():
            for kind in ("queried", "hit"):
                self.prefix_cache_tokens.labels(tenant, kind).set(counts[f"{kind}_tokens"])
        return generate_latest(self.registry)
