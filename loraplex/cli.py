"""The `loraplex` command line: thin wrappers that parse, call the library, and print."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from loraplex.bench.cli import bench_command
from loraplex.cli_support import actor, err, fail, open_registry, or_fail, parse_duration
from loraplex.config import AUTH_FAILURE_WINDOW_S, MAX_AUTH_FAILURE_ADDRESSES, MAX_AUTH_FAILURES
from loraplex.export.cli import export_app
from loraplex.registry.tenants import DEFAULT_ROTATION_OVERLAP_S
from loraplex.train.cli import train_command
from loraplex.usage_cli import quota_command, usage_command
from loraplex.vault.cli import data_app

app = typer.Typer(help="loraplex: one base LLM, many tenants' LoRA adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.command()
def pull(name: Annotated[str, typer.Argument(help="A default model, e.g. smollm2-135m")]):
    """Fetch a default model into the loraplex home ($LORAPLEX_HOME, default ~/.loraplex)."""
    from loraplex.model.pull import PullError
    from loraplex.model.pull import pull as pull_model

    try:
        path = pull_model(name)
    except PullError as e:
        fail(str(e))
    typer.echo(path)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user's message")],
    model: Annotated[str, typer.Option(help="Default model name or checkpoint dir")] = (
        "smollm2-135m"
    ),
    adapter: Annotated[Path | None, typer.Option(help="A PEFT LoRA adapter directory")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    raw: Annotated[bool, typer.Option(help="Send the prompt as is, without the chat template")] = (
        False
    ),
):
    """Answer one question with the base model or an adapter (applies the chat template)."""
    from loraplex import LLM, SamplingParams
    from loraplex.model.pull import PullError

    try:
        llm = LLM(model, dtype=dtype, max_loras=1, max_cpu_loras=1)
        text = prompt if raw else llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}]
        )
        ids = llm.tokenizer.encode(text, add_special_tokens=raw)
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        out = llm.generate(ids, params, adapters=[adapter])[0]
    except (ValueError, OSError, PullError) as e:  # each carries a clear message
        fail(str(e))
    if out.error:
        fail(out.error)
    typer.echo(out.text.strip())


@app.command()
def plan(
    model: Annotated[str, typer.Option(
        help="A known model (e.g. llama-3.1-8b, qwen3-8b, gemma-3-27b, phi-4: an unknown name "
        "lists them), a config.json or a checkpoint dir")] = "smollm2-135m",
    rank: Annotated[str, typer.Option(
        help="LoRA rank of the adapters, or a mix of as many of each, e.g. 8,16,32,64")] = "16",
    targets: Annotated[str, typer.Option(help="all | attn | a comma list, e.g. q_proj,v_proj")] = (
        "all"
    ),
    clients: Annotated[int, typer.Option(help="Tenants, one adapter each")] = 50,
    memory: Annotated[str, typer.Option(help="Device memory budget, e.g. 24GiB or 80GB")] = (
        "24GiB"
    ),
    host_memory: Annotated[str | None, typer.Option(
        help="RAM for the host adapter cache (default: same as --memory)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    lora_dtype: Annotated[str, typer.Option(
        help="Adapter weights in slots: auto (the model's dtype) | int8")] = "auto",
    weights: Annotated[str, typer.Option(
        help="Base weights: auto (--dtype) | int8 | 4bit (a quantized base, for comparison: "
        "loraplex serves the base in --dtype)")] = "auto",
):
    """How many adapters and how much context fit in a memory budget (no model is loaded)."""
    from rich.table import Table

    from loraplex.config import LORA_DTYPES
    from loraplex.model.loader import plan_config
    from loraplex.model.pull import PullError
    from loraplex.plan import (
        ACTIVATION_RESERVE_BYTES,
        RESERVE_PERCENT,
        dtype_bytes,
        format_bytes,
        parse_bytes,
        parse_ranks,
        plan_capacity,
    )

    try:
        if lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype must be one of {', '.join(LORA_DTYPES)}, "
                             f"got {lora_dtype!r}")
        memory_bytes = parse_bytes(memory)
        host_memory_bytes = None if host_memory is None else parse_bytes(host_memory)
        config = plan_config(model)
        p = plan_capacity(config, rank=parse_ranks(rank), targets=targets, clients=clients,
                          memory_bytes=memory_bytes, dtype_bytes=dtype_bytes(dtype),
                          host_memory_bytes=host_memory_bytes,
                          int8_slots=lora_dtype == "int8", weights=weights)
    except (ValueError, OSError, PullError) as e:  # each carries a clear message
        fail(str(e))

    table = Table("", "size", "what it is", title=(
        f"{model}, {dtype}{'' if weights == 'auto' else f' ({weights} base)'}, rank {rank} on "
        f"{targets}: "
        f"{clients} clients in {format_bytes(p.memory_bytes)}"))
    table.add_row("base model", format_bytes(p.base_weight_bytes),
                  f"{p.num_base_params:,} parameters")
    table.add_row("one adapter", format_bytes(p.bytes_per_adapter),
                  "in the host cache and on disk (its target modules)")
    table.add_row("one adapter in a slot", format_bytes(p.bytes_per_slot),
                  f"{'the mean of its ' if len(p.ranks) > 1 else 'its '}pages of "
                  f"{p.page_rank} rank rows ({format_bytes(p.bytes_per_page)} each) of all "
                  "seven modules, whatever an adapter targets"
                  + (", int8 with a scale per rank row" if p.int8_slots else ""))
    table.add_row("KV cache per token", format_bytes(p.kv_bytes_per_token),
                  f"2 x {config.num_layers} layers x {config.num_kv_heads} kv heads x "
                  f"{config.head_dim} x {p.dtype_bytes} bytes")
    table.add_row("runtime reserve", format_bytes(p.reserve_bytes),
                  f"{RESERVE_PERCENT}% + {format_bytes(ACTIVATION_RESERVE_BYTES)} activations")
    table.add_row("left for slots + KV", format_bytes(p.available_bytes),
                  "after the base model and the reserve")
    table.add_row("smallest budget", format_bytes(p.min_memory_bytes),
                  "base model, one slot, one full-context sequence and the reserve")
    table.add_row("adapters resident at most", f"{p.max_resident_adapters:,}",
                  "slots that fit while keeping KV room for one full-context sequence")
    table.add_row("device slots", format_bytes(p.slot_bytes),
                  f"--max-loras {p.max_loras} --max-lora-pages {p.max_lora_pages}")
    table.add_row("host cache", format_bytes(p.host_cache_bytes),
                  f"--max-cpu-loras {p.max_cpu_loras}")
    table.add_row("KV cache", format_bytes(p.kv_cache_bytes),
                  f"{p.num_kv_tokens:,} tokens = {p.num_full_context_seqs:,} sequences of "
                  f"{p.context_len:,}")
    table.add_row("one model per client", format_bytes(p.dedicated_bytes),
                  f"{p.dedicated_ratio:.1f}x loraplex's {format_bytes(p.loraplex_bytes)}")
    table.add_row("storage on disk", format_bytes(p.dedicated_storage_bytes),
                  f"{clients} fine-tuned copies of the base, vs "
                  f"{format_bytes(p.loraplex_storage_bytes)}: one base + {clients} adapters")
    console = Console()
    console.print(table)

    if weights != "auto":  # no serve flags: they would not fit the base loraplex loads
        console.print(f"The base is sized as {weights} weights, for comparison: loraplex serves "
                      "base weights in --dtype (plan with --weights auto for its flags).",
                      highlight=False)
        return
    on_disk = clients - p.max_cpu_loras
    disk_note = (f" The other {on_disk} adapters load from disk on first use." if on_disk > 0
                 else " Every client's adapter stays in the host cache.")
    console.print(
        f"Run [bold]loraplex serve --dtype {dtype} --max-lora-rank {p.rank} "
        f"{'--lora-dtype int8 ' if p.int8_slots else ''}--max-loras "
        f"{p.max_loras} --max-lora-pages {p.max_lora_pages} --max-cpu-loras "
        f"{p.max_cpu_loras} --kv-cache {p.kv_cache_bytes}[/]: up "
        f"to {p.max_loras} different adapters share a batch, and {p.max_cpu_loras} stay loaded "
        f"in RAM.{disk_note} The KV cache holds {p.num_full_context_seqs:,} full "
        f"{p.context_len:,}-token conversations at once.",
        highlight=False)


# -- administration: operates directly on the registry in the loraplex home ---------------------
tenant_app = typer.Typer(help="Tenants (clients of the agency).", no_args_is_help=True)
key_app = typer.Typer(help="API keys.", no_args_is_help=True)
adapter_app = typer.Typer(help="Adapters, versions and deployments.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")
app.add_typer(adapter_app, name="adapter")
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")
app.command("train")(train_command)
app.command("bench")(bench_command)
app.command("usage")(usage_command)
tenant_app.command("quota")(quota_command)


def _split_text(split: dict[int, int]) -> str:
    return " ".join(f"v{n}={w}" for n, w in sorted(split.items()))


@tenant_app.command("create")
def tenant_create(name: str, allow_base_model: bool = typer.Option(
        False, help="Also let this tenant call the bare base model")):
    """Register a tenant."""
    registry = open_registry()
    tenant = or_fail(registry.create_tenant, name, actor=actor())
    if allow_base_model:
        or_fail(registry.set_base_model_access, name, True, actor=actor())
    typer.echo(f"tenant {tenant.name} created")


@tenant_app.command("list")
def tenant_list():
    """List tenants."""
    from rich.table import Table

    table = Table("tenant", "created", "adapters")
    registry = open_registry()
    for tenant in registry.list_tenants():
        table.add_row(tenant.name, tenant.created_at,
                      str(len(registry.list_adapters(tenant.name))))
    Console().print(table)


@key_app.command("create")
def key_create(tenant: str):
    """Create an API key for a tenant (printed once; only its hash is stored)."""
    key_id, key = or_fail(open_registry().create_key, tenant, actor=actor())
    err.print(f"key {key_id} for {tenant} (shown once, store it now):")
    typer.echo(key)


@key_app.command("revoke")
def key_revoke(key_id: str):
    """Revoke a key; requests with it get 401 from the next request on."""
    or_fail(open_registry().revoke_key, key_id, actor=actor())
    typer.echo(f"key {key_id} revoked")


@key_app.command("rotate")
def key_rotate(key_id: str, overlap: Annotated[str, typer.Option(
        help="How long the old key keeps working, e.g. 30m, 24h, 7d (0: stops now)")
        ] = f"{DEFAULT_ROTATION_OVERLAP_S // 3600}h"):
    """Replace a tenant or admin key: a new key (printed once) now, the old one expires after
    the overlap, time to roll the new key out."""
    new_id, key, old = or_fail(open_registry().rotate_key, key_id, actor=actor(),
                               overlap_s=or_fail(parse_duration, overlap))
    err.print(f"key {new_id} replaces {key_id}, which expires at {old.expires_at} "
              "(shown once, store it now):")
    typer.echo(key)


@key_app.command("admin")
def key_admin():
    """Create an admin key for the /admin/ HTTP API (printed once)."""
    key_id, key = or_fail(open_registry().create_admin_key, actor=actor())
    err.print(f"admin key {key_id} (shown once, store it now):")
    typer.echo(key)


@adapter_app.command("push")
def adapter_push(
    tenant: str, name: str,
    peft_dir: Annotated[Path, typer.Argument(help="PEFT adapter directory")],
    model: Annotated[str, typer.Option(help="Base model to validate against")] = "smollm2-135m",
    promote: Annotated[bool, typer.Option(help="Serve the new version at once")] = False,
):
    """Store a PEFT adapter as the next version of TENANT's adapter NAME."""
    from loraplex.home import loraplex_home
    from loraplex.validation import adapter_validator
    from loraplex.vault.artifacts import ArtifactSealer

    sealer = or_fail(ArtifactSealer.for_home, loraplex_home())
    version = or_fail(open_registry().push_version, tenant, name, peft_dir, actor=actor(),
                     validate=adapter_validator(model), sealer=sealer, promote=promote)
    typer.echo(f"{name} {version.label} (id {version.id}, sha256 {version.sha256[:12]}, "
               f"rank {version.rank})")


@adapter_app.command("list")
def adapter_list(tenant: str):
    """A tenant's adapters, their versions and traffic split."""
    from rich.table import Table

    table = Table("adapter", "versions", "split", "serving")
    for info in or_fail(open_registry().list_adapters, tenant):
        table.add_row(info.name, ", ".join(v.label for v in info.versions),
                      _split_text(info.split), f"v{info.active}")
    Console().print(table)


@adapter_app.command("show")
def adapter_show(tenant: str, name: str):
    """Every version of an adapter with its training record."""
    import json

    info = or_fail(open_registry().show_adapter, tenant, name)
    typer.echo(f"{info.name}: split {_split_text(info.split)}")
    for v in info.versions:
        typer.echo(f"  {v.label}  id {v.id}  sha256 {v.sha256[:12]}  rank {v.rank}  "
                   f"{v.size_bytes} bytes  by {v.created_by} at {v.created_at}")
        if v.training_record:
            typer.echo("    training: " + json.dumps(v.training_record, sort_keys=True))


@adapter_app.command("promote")
def adapter_promote(tenant: str, name: str, version: str):
    """Send all traffic to VERSION (e.g. v2)."""
    from loraplex.server.admin import parse_split

    number = next(iter(or_fail(parse_split, {version: 100})))
    split = or_fail(open_registry().promote, tenant, name, number, actor=actor())
    typer.echo(f"{name}: {_split_text(split)}")


@adapter_app.command("rollback")
def adapter_rollback(tenant: str, name: str):
    """Go back to the split that was live before the last change."""
    split = or_fail(open_registry().rollback, tenant, name, actor=actor())
    typer.echo(f"{name}: {_split_text(split)}")


@adapter_app.command("split")
def adapter_split(tenant: str, name: str,
                  weights: Annotated[list[str], typer.Argument(help="e.g. v1=90 v2=10")]):
    """Split traffic between versions (weights add up to 100; sticky per end user)."""
    from loraplex.server.admin import parse_split

    spec = {}
    for item in weights:
        version, _, weight = item.partition("=")
        if not weight.isdigit():
            fail(f"{item!r} should look like v1=90")
        spec[version] = int(weight)
    split = or_fail(open_registry().split, tenant, name, or_fail(parse_split, spec), actor=actor())
    typer.echo(f"{name}: {_split_text(split)}")


@adapter_app.command("stats")
def adapter_stats(tenant: str, name: str):
    """Per-version counters, to compare the arms of a split."""
    from rich.table import Table

    table = Table("version", "requests", "errors", "prompt tok", "completion tok",
                  "mean latency ms", "mean TTFT ms")
    for row in or_fail(open_registry().version_stats, tenant, name):
        def fmt(value):
            return "-" if value is None else f"{value:.1f}"
        table.add_row(row["version"], str(row["requests"]), str(row["errors"]),
                      str(row["prompt_tokens"]), str(row["completion_tokens"]),
                      fmt(row["mean_latency_ms"]), fmt(row["mean_ttft_ms"]))
    Console().print(table)


@app.command()
def audit(limit: int = 50, tenant: str | None = None):
    """The audit log of administrative actions, newest first."""
    for entry in or_fail(open_registry().audit_log, limit=limit, tenant=tenant):
        typer.echo(f"{entry.at}  {entry.actor:<24} {entry.action:<28} {entry.target}  "
                   f"{entry.details or ''}")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Default model name or checkpoint dir")] = (
        "smollm2-135m"
    ),
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "float32",
    max_loras: int = 8,
    max_cpu_loras: int = 64,
    max_lora_rank: int = 16,
    max_lora_pages: Annotated[int | None, typer.Option(
        help="Device memory for adapters, in pages of 8 rank rows: an adapter takes those of "
        "its rank (default: --max-loras adapters of --max-lora-rank; see `loraplex plan`)")] = None,
    lora_dtype: Annotated[str, typer.Option(
        help="Adapter weights in slots: auto (the model's dtype) | int8 (half the bytes of "
        "bf16: faster decode steps with many adapters, see BENCHMARKS.md)")] = "auto",
    max_num_seqs: int = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(
        help="Tokens computed in one step (prompts are prefilled in chunks of this)")] = 512,
    scheduling: Annotated[str, typer.Option(
        help="fair (tenants share by their tiers: `loraplex tenant quota --tier`) | fcfs "
        "(first come, first served)")] = "fair",
    max_model_len: Annotated[int | None, typer.Option(help="Context length")] = None,
    return_window_ms: Annotated[float, typer.Option(
        help="After a step that finished requests, wait up to this long for their clients' next "
        "requests (while clients do answer at once: agents, load generators), so those join "
        "the next step; 0: never wait")] = 50.0,
    prefix_caching: Annotated[bool, typer.Option(
        help="Reuse the KV cache of a prompt's beginning that the same tenant sent before on the "
        "same adapter version (chat turns, system prompts); never across tenants")] = True,
    max_concurrent_per_tenant: Annotated[int, typer.Option(
        help="A tenant's concurrent requests unless its quota says otherwise")] = 32,
    prewarm: Annotated[str, typer.Option(
        help="At start, load the serving versions of the N most recently used adapters (all: "
        "as many as --max-cpu-loras holds; none)")] = "all",
    allow_private_webhooks: Annotated[bool, typer.Option(
        help="Deliver webhooks to http:// URLs and private addresses too (a closed network); "
        "by default only https to public addresses")] = False,
    kv_cache: Annotated[str | None, typer.Option(
        help="KV cache size, e.g. 8GiB (default: 10% of device memory; see `loraplex plan`)")] = (
        None),
    max_auth_failures: Annotated[int, typer.Option(
        help="Failed authentications a client address may make per --auth-failure-window; "
        "beyond, they get 429 with Retry-After (a valid key still works)")] = MAX_AUTH_FAILURES,
    auth_failure_window: Annotated[str, typer.Option(
        help="The window of --max-auth-failures, e.g. 60s, 15m")] = (
        f"{AUTH_FAILURE_WINDOW_S:g}s"),
    max_auth_failure_addresses: Annotated[int, typer.Option(
        help="Client addresses whose failures are remembered at once (the least recently "
        "failing is forgotten first)")] = MAX_AUTH_FAILURE_ADDRESSES,
    use_ray: Annotated[bool, typer.Option(
        "--ray", help="Scale out on Ray Serve: a gateway and engine replicas (pip install "
        "'loraplex\\[ray]'); the loraplex home must be on storage every node shares")] = False,
    replicas: Annotated[int, typer.Option(min=1, help="With --ray: engine replicas")] = 2,
    address: Annotated[str | None, typer.Option(
        help="With --ray: an existing cluster (auto, or ray://host:10001); default: start a "
        "local Ray instance")] = None,
    cpus_per_replica: Annotated[float, typer.Option(
        help="With --ray: CPUs each replica reserves (fractions are fine)")] = 1.0,
    gpus_per_replica: Annotated[float, typer.Option(
        help="With --ray: GPUs each replica reserves (1: each on its own GPU)")] = 0.0,
):
    """Serve the OpenAI-compatible API for every tenant (Ctrl-C / SIGTERM finishes running
    requests, then stops)."""
    from loraplex.config import EngineConfig
    from loraplex.model.pull import PullError, resolve_model
    from loraplex.plan import parse_bytes
    from loraplex.server.app import ServerSettings

    registry = open_registry()
    if not registry.list_admin_keys():
        key_id, key = registry.create_admin_key(actor=actor())
        err.print(f"first start: admin key {key_id} (shown once, store it now):\n{key}")
    try:
        config = EngineConfig(
            model=model, dtype=dtype, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
            max_lora_rank=max_lora_rank, max_lora_pages=max_lora_pages, lora_dtype=lora_dtype,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, scheduling=scheduling,
            max_model_len=max_model_len, enable_prefix_caching=prefix_caching,
            return_window_ms=return_window_ms,
            kv_cache_bytes=None if kv_cache is None else parse_bytes(kv_cache))
        resolve_model(model)  # pull a default model once here, not in every engine at once
    except (ValueError, OSError, PullError) as e:
        fail(str(e))
    try:
        settings = ServerSettings(
            base_model_name=Path(model).name, max_concurrent_per_tenant=max_concurrent_per_tenant,
            allow_private_webhooks=allow_private_webhooks, prewarm_adapters=_prewarm_count(prewarm),
            max_auth_failures=max_auth_failures,
            auth_failure_window_s=parse_duration(auth_failure_window),
            max_auth_failure_addresses=max_auth_failure_addresses)
    except ValueError as e:
        fail(str(e))
    if use_ray:
        _serve_on_ray(config, registry.home, settings, host=host, port=port, replicas=replicas,
                      address=address, cpus_per_replica=cpus_per_replica,
                      gpus_per_replica=gpus_per_replica)
        return

    import uvicorn

    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.server.app import create_app
    from loraplex.validation import adapter_validator

    try:
        engine = AsyncEngine(config)
        validate = adapter_validator(model)
    except (ValueError, OSError, PullError) as e:
        fail(str(e))
    app_ = create_app(engine, registry, settings, validate)
    err.print(f"serving {model} on http://{host}:{port} (OpenAI API under /v1)")
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)


def _prewarm_count(spec: str) -> int | None:
    """--prewarm: None for all (as many as the host cache holds), else a count."""
    if spec == "all":
        return None
    if spec == "none":
        return 0
    if not (spec.isdigit() and len(spec) <= 6):
        fail(f"--prewarm takes a number, all or none; got {spec!r}")
    return int(spec)


def _serve_on_ray(config, home: Path, settings, *, host: str, port: int, replicas: int,
                  address: str | None, cpus_per_replica: float, gpus_per_replica: float):
    try:
        from loraplex.ray_serve.deploy import build_app, connect, serve_forever
    except ImportError as e:  # Ray is an optional extra; the single-machine server never needs it
        # "\\[": a literal bracket, not rich markup.
        fail(f"--ray needs Ray Serve ({e}): pip install 'loraplex\\[ray]'")
    try:
        connect(address, replicas * cpus_per_replica)
    except (ValueError, ConnectionError) as e:
        fail(str(e))
    app_ = build_app(config, home, settings, num_replicas=replicas,
                     num_cpus_per_replica=cpus_per_replica,
                     num_gpus_per_replica=gpus_per_replica)
    err.print(f"serving {config.model} on {replicas} Ray Serve replicas at http://{host}:{port} "
              "(OpenAI API under /v1; first start takes a while)")
    serve_forever(app_, host=host, port=port)


if __name__ == "__main__":
    app()
