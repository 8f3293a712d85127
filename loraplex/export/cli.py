"""`loraplex export ...`: a registry version and the base model -> files other runtimes load.

Registered by loraplex/cli.py as `loraplex export`. Heavy imports (torch, gguf) happen inside
the command, so `loraplex --help` stays fast.
"""

import time
from pathlib import Path
from typing import Annotated

import typer

export_app = typer.Typer(
    help="Export the base model or a tenant's adapter for llama.cpp and Ollama.",
    no_args_is_help=True,
)


@export_app.command("gguf")
def export_gguf(
    out: Annotated[Path, typer.Option("--out", "-o", help="The GGUF file to write")],
    tenant: Annotated[str | None, typer.Argument(
        metavar="TENANT", help="The tenant that owns the adapter")] = None,
    adapter: Annotated[str | None, typer.Argument(
        metavar="ADAPTER[@VERSION]",
        help="e.g. support-bot@v3; without @VERSION, the version serving most traffic")] = None,
    base: Annotated[bool, typer.Option(
        "--base", help="Export the bare base model (give no TENANT or ADAPTER)")] = False,
    adapter_only: Annotated[bool, typer.Option(
        "--adapter-only",
        help="Write only the adapter, as a llama.cpp LoRA GGUF for the exported base")] = False,
    base_gguf: Annotated[str | None, typer.Option(
        help="With --adapter-only: the base GGUF the Modelfile's FROM names",
        show_default="./<model>.gguf beside --out")] = None,
    dtype: Annotated[str, typer.Option(help="f32 | f16 | bf16 | q8_0")] = "f16",
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out and its Modelfile")] = (
        False
    ),
    model: Annotated[str, typer.Option(help="Default model name or checkpoint dir")] = (
        "smollm2-135m"
    ),
):
    """Write a GGUF for llama.cpp and an Ollama Modelfile beside it (bot.gguf: bot.Modelfile).

    \b
    loraplex export gguf acme support-bot@v3 --out bot.gguf
        the base model with v3 of support-bot merged in
    loraplex export gguf acme support-bot --out bot.gguf
        the same with the version that serves most traffic now
    loraplex export gguf acme support-bot --adapter-only --out bot-lora.gguf
        the adapter alone, for llama.cpp's --lora on the exported base
    loraplex export gguf --base --out smollm2-135m.gguf
        the bare base model

    Norm weights stay f32 whatever --dtype says. With q8_0, rows that are
    not whole 32-value blocks (the B of a rank-16 LoRA) are stored f16.
    """
    from loraplex.cli_support import actor, fail, open_registry, or_fail
    from loraplex.export.gguf import export_merged
    from loraplex.export.version import export_version
    from loraplex.model.pull import PullError, resolve_model
    from loraplex.vault.artifacts import ArtifactSealer

    if base == (tenant is not None or adapter is not None):
        fail("give TENANT and ADAPTER to export an adapter, or --base for the bare base model")
    if base and adapter_only:
        fail("--adapter-only exports an adapter; it cannot go with --base")
    if tenant is not None and adapter is None:
        fail(f"missing the ADAPTER of tenant {tenant!r} (e.g. support-bot or support-bot@v3)")
    registry = open_registry()
    version = None
    if not base:
        name, _, version_text = adapter.partition("@")
        if not version_text:  # the version most users get now
            number = or_fail(registry.show_adapter, tenant, name).active
        elif version_text.removeprefix("v").isdigit():
            number = int(version_text.removeprefix("v"))
        else:
            fail(f"version {version_text!r} should look like v3")
        version = or_fail(registry.get_version, tenant, name, number)

    started = time.perf_counter()
    try:
        model_dir = resolve_model(model)
        if version is not None:
            result = export_version(ArtifactSealer.for_home(registry.home), model_dir, tenant,
                                    version, out, dtype, adapter_only=adapter_only,
                                    base_gguf=base_gguf, force=force)
        else:
            result = export_merged(model_dir, out, dtype, force=force)
    except (ValueError, OSError, PullError) as e:  # each carries a clear message
        fail(str(e))
    seconds = time.perf_counter() - started

    details = {"dtype": dtype, "out": str(result.gguf_path.resolve())}
    if base:
        or_fail(registry.record_audit, actor(), "export.gguf", f"model:{model_dir.name}",
               details)
    else:
        details |= {"version": version.label, "adapter_only": adapter_only}
        or_fail(registry.record_audit, actor(), "export.gguf", f"{tenant}/{name}", details,
               tenant=tenant)
    typer.echo(f"wrote {result.gguf_path} ({result.num_bytes / 1e6:.1f} MB, {dtype}) "
               f"in {seconds:.1f}s")
    typer.echo(f"wrote {result.modelfile_path}")
