"""The `loraplex` command line: thin wrappers that parse, call the library, and print."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="loraplex: one base LLM, many tenants' LoRA adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


@app.command()
def pull(name: Annotated[str, typer.Argument(help="A default model, e.g. smollm2-135m")]):
    """Fetch a default model into the loraplex home ($LORAPLEX_HOME, default ~/.loraplex)."""
    from loraplex.model.pull import PullError
    from loraplex.model.pull import pull as pull_model

    try:
        path = pull_model(name)
    except PullError as e:
        _fail(str(e))
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
        _fail(str(e))
    if out.error:
        _fail(out.error)
    typer.echo(out.text.strip())


# -- administration: operates directly on the registry in the loraplex home ---------------------
tenant_app = typer.Typer(help="Tenants (clients of the agency).", no_args_is_help=True)
key_app = typer.Typer(help="API keys.", no_args_is_help=True)
adapter_app = typer.Typer(help="Adapters, versions and deployments.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")
app.add_typer(adapter_app, name="adapter")


def _registry():
    from loraplex.home import loraplex_home
    from loraplex.registry import Registry

    return Registry(loraplex_home())


def _actor() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


def _admin(function, *args, **kwargs):
    """Run a registry operation; its errors become one clear line and exit status 1."""
    from loraplex.registry import RegistryError

    try:
        return function(*args, **kwargs)
    except RegistryError as e:
        _fail(str(e))


def _split_text(split: dict[int, int]) -> str:
    return " ".join(f"v{n}={w}" for n, w in sorted(split.items()))


@tenant_app.command("create")
def tenant_create(name: str, allow_base_model: bool = typer.Option(
        False, help="Also let this tenant call the bare base model")):
    """Register a tenant."""
    registry = _registry()
    tenant = _admin(registry.create_tenant, name, actor=_actor())
    if allow_base_model:
        _admin(registry.set_base_model_access, name, True, actor=_actor())
    typer.echo(f"tenant {tenant.name} created")


@tenant_app.command("list")
def tenant_list():
    """List tenants."""
    from rich.table import Table

    table = Table("tenant", "created", "adapters")
    registry = _registry()
    for tenant in registry.list_tenants():
        table.add_row(tenant.name, tenant.created_at,
                      str(len(registry.list_adapters(tenant.name))))
    Console().print(table)


@key_app.command("create")
def key_create(tenant: str):
    """Create an API key for a tenant (printed once; only its hash is stored)."""
    key_id, key = _admin(_registry().create_key, tenant, actor=_actor())
    err.print(f"key {key_id} for {tenant} (shown once, store it now):")
    typer.echo(key)


@key_app.command("revoke")
def key_revoke(key_id: str):
    """Revoke a key; requests with it get 401 from the next request on."""
    _admin(_registry().revoke_key, key_id, actor=_actor())
    typer.echo(f"key {key_id} revoked")


@key_app.command("admin")
def key_admin():
    """Create an admin key for the /admin/ HTTP API (printed once)."""
    key_id, key = _admin(_registry().create_admin_key, actor=_actor())
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
    from loraplex.validation import adapter_validator

    version = _admin(_registry().push_version, tenant, name, peft_dir, actor=_actor(),
                     validate=adapter_validator(model), promote=promote)
    typer.echo(f"{name} {version.label} (id {version.id}, sha256 {version.sha256[:12]}, "
               f"rank {version.rank})")


@adapter_app.command("list")
def adapter_list(tenant: str):
    """A tenant's adapters, their versions and traffic split."""
    from rich.table import Table

    table = Table("adapter", "versions", "split", "serving")
    for info in _admin(_registry().list_adapters, tenant):
        table.add_row(info.name, ", ".join(v.label for v in info.versions),
                      _split_text(info.split), f"v{info.active}")
    Console().print(table)


@adapter_app.command("show")
def adapter_show(tenant: str, name: str):
    """Every version of an adapter with its training record."""
    import json

    info = _admin(_registry().show_adapter, tenant, name)
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

    number = next(iter(_admin(parse_split, {version: 100})))
    split = _admin(_registry().promote, tenant, name, number, actor=_actor())
    typer.echo(f"{name}: {_split_text(split)}")


@adapter_app.command("rollback")
def adapter_rollback(tenant: str, name: str):
    """Go back to the split that was live before the last change."""
    split = _admin(_registry().rollback, tenant, name, actor=_actor())
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
            _fail(f"{item!r} should look like v1=90")
        spec[version] = int(weight)
    split = _admin(_registry().split, tenant, name, _admin(parse_split, spec), actor=_actor())
    typer.echo(f"{name}: {_split_text(split)}")


@adapter_app.command("stats")
def adapter_stats(tenant: str, name: str):
    """Per-version counters, to compare the arms of a split."""
    from rich.table import Table

    table = Table("version", "requests", "errors", "prompt tok", "completion tok",
                  "mean latency ms", "mean TTFT ms")
    for row in _admin(_registry().version_stats, tenant, name):
        def fmt(value):
            return "-" if value is None else f"{value:.1f}"
        table.add_row(row["version"], str(row["requests"]), str(row["errors"]),
                      str(row["prompt_tokens"]), str(row["completion_tokens"]),
                      fmt(row["mean_latency_ms"]), fmt(row["mean_ttft_ms"]))
    Console().print(table)


@app.command()
def audit(limit: int = 50, tenant: str | None = None):
    """The audit log of administrative actions, newest first."""
    for entry in _admin(_registry().audit_log, limit=limit, tenant=tenant):
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
    max_num_seqs: int = 64,
    max_model_len: Annotated[int | None, typer.Option(help="Context length")] = None,
    max_concurrent_per_tenant: int = 32,
):
    """Serve the OpenAI-compatible API for every tenant (Ctrl-C / SIGTERM finishes running
    requests, then stops)."""
    import uvicorn

    from loraplex.config import EngineConfig
    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.model.pull import PullError
    from loraplex.server.app import ServerSettings, create_app
    from loraplex.validation import adapter_validator

    registry = _registry()
    if not registry.list_admin_keys():
        key_id, key = registry.create_admin_key(actor=_actor())
        err.print(f"first start: admin key {key_id} (shown once, store it now):\n{key}")
    try:
        engine = AsyncEngine(EngineConfig(
            model=model, dtype=dtype, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
            max_lora_rank=max_lora_rank, max_num_seqs=max_num_seqs,
            max_model_len=max_model_len))
        validate = adapter_validator(model)
    except (ValueError, OSError, PullError) as e:
        _fail(str(e))
    settings = ServerSettings(base_model_name=Path(model).name,
                              max_concurrent_per_tenant=max_concurrent_per_tenant)
    app_ = create_app(engine, registry, settings, validate)
    err.print(f"serving {model} on http://{host}:{port} (OpenAI API under /v1)")
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)


if __name__ == "__main__":
    app()
