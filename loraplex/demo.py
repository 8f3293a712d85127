"""The agency demo (`./scripts/demo`, `python -m loraplex.demo`): three clients, one base model.

Steps, each reusing what an earlier run left (in its own home, `<loraplex home>/demo`):
1. the base model (pulled once into the loraplex home);
2. three tenants (clinic, shop, law), each with its dataset from examples/agency in the vault;
3. each tenant's adapter trained on its own data: version v1;
4. the server started, a key per tenant, the same question asked by all three at once;
5. a v2 for the shop, an 80/20 split, the per-version counters, a rollback;
6. one tenant's model exported as a GGUF with its Ollama Modelfile;
7. the adapter cache statistics and where everything lives; the server stopped.
A failing step says what went wrong and how to fix it, and exits 1.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.table import Table

from loraplex.cli_support import fail

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "agency"
ACTOR = "demo"
ADAPTER = "assistant"
QUESTION = "I have a busy week ahead. Any advice?"
# Each tenant's data teaches a fixed frame, so a rule can tell the styles apart.
TENANTS = {
    "clinic": ("medical clinic", "formal clinical notes", "Clinical note:"),
    "shop": ("online shop", "casual, upbeat product copy", "Hey there!"),
    "law": ("law firm", "structured legal summaries", "Summary:"),
}
V2_TENANT = "shop"
SPLIT_REQUESTS = 20

console = Console(highlight=False)


@dataclass
class DemoSettings:
    model: str = "smollm2-135m"  # a default model name or a checkpoint dir
    home: Path | None = None  # default: <loraplex home>/demo
    data_dir: Path = EXAMPLES
    steps: int = 30  # training steps per adapter (about a second each on two CPU cores)
    rank: int = 8
    lr: float = 2e-3
    max_tokens: int = 48
    export_dtype: str = "q8_0"
    export_tenant: str = "law"


@dataclass
class DemoResult:
    """What the demo did, for tests: trained adapters, the answers, the A/B counters..."""

    home: Path
    trained: list[str] = field(default_factory=list)  # "clinic/assistant@v1", ...
    answers: dict[str, str] = field(default_factory=dict)  # tenant -> answer
    split_served: dict[str, int] = field(default_factory=dict)  # "v1" -> requests
    split_after_rollback: dict[int, int] = field(default_factory=dict)
    console_key: str | None = None  # the admin key printed for the web console
    export_path: Path | None = None
    engine_stats: dict = field(default_factory=dict)


@contextmanager
def step(number: int, title: str, fix: str):
    """One numbered step: its title, then its failure (with how to fix it) or its time."""
    console.rule(f"[bold]{number}. {title}")
    started = time.monotonic()
    try:
        yield
    except typer.Exit:  # an inner step has already said what failed
        raise
    except Exception as e:  # the demo's top level: a message and a fix, never a traceback
        fail(f"step {number} ({title}) failed: {type(e).__name__}: {e}\n  how to fix: {fix}")
    console.print(f"[dim]done in {time.monotonic() - started:.1f} s[/]")


def run_demo(settings: DemoSettings) -> DemoResult:
    from loraplex.home import loraplex_home
    from loraplex.model.pull import resolve_model
    from loraplex.registry import Registry

    home = settings.home or loraplex_home() / "demo"
    result = DemoResult(home=home)
    with step(1, "the base model", "check the network to PyPI and the disk space, then rerun"):
        model_dir = resolve_model(settings.model)
        console.print(f"{settings.model}: {model_dir}")
    registry = Registry(home)
    try:
        with step(2, "three tenants and their data", f"check the files in {settings.data_dir}"):
            _tenants_and_data(registry, settings)
        with step(3, "training each tenant's adapter", "rerun; a half-done training leaves "
                  "nothing behind, so it starts over"):
            for tenant in TENANTS:
                if not registry.list_adapters(tenant):
                    _train(home, tenant, model_dir, settings, seed=0, promote=True)
                    result.trained.append(f"{tenant}/{ADAPTER}@v1")
                else:
                    console.print(f"{tenant}/{ADAPTER}: v1 exists, reused")
        _serve_and_show(registry, model_dir, settings, result)
        result.console_key = _show_console(registry, home, model_dir)
    finally:
        registry.close()
    return result


CONSOLE_KEY_FILE = "console-key-id"  # in the demo's home: the key id the last run printed


def _show_console(registry, home: Path, model_dir: Path) -> str:
    """The web console's URL and an admin key to sign in with (the previous run's is revoked,
    so reruns do not pile up live admin keys)."""
    from loraplex.registry import NotFound

    id_file = home / CONSOLE_KEY_FILE
    if id_file.exists():
        try:
            registry.revoke_key(id_file.read_text().strip(), actor=ACTOR)
        except NotFound:
            pass
    key_id, key = registry.create_admin_key(actor=ACTOR)
    id_file.write_text(key_id)
    console.rule("[bold]8. the web console")
    console.print(f"start the server on the demo's home (its tenants, adapters and data):\n"
                  f"  LORAPLEX_HOME={home} loraplex serve --model {model_dir}")
    console.print("then open [bold]http://127.0.0.1:8000/console[/] and sign in with the "
                  f"admin key:\n  {key}")
    return key


def _tenants_and_data(registry, settings: DemoSettings) -> None:
    from loraplex.registry import NotFound
    from loraplex.vault import Vault

    with Vault(registry.home) as vault:
        for tenant, (kind, style, _) in TENANTS.items():
            try:
                registry.get_tenant(tenant)
                note = "exists"
            except NotFound:
                registry.create_tenant(tenant, actor=ACTOR)
                note = "created"
            data = (settings.data_dir / f"{tenant}.jsonl").read_bytes()
            versions = [v for v in vault.list(tenant) if v.name == "style"]
            if versions and versions[-1].sha256 == hashlib.sha256(data).hexdigest():
                dataset = versions[-1]
            else:
                dataset = vault.add(tenant, "style", data, actor=ACTOR)
            console.print(f"{tenant:<7} {kind} ({style}): tenant {note}; dataset style "
                          f"{dataset.label}, {dataset.num_records} records, encrypted")


def _train(home: Path, tenant: str, model_dir: Path, settings: DemoSettings, *, seed: int,
           promote: bool) -> str:
    from loraplex.train import train_adapter

    console.print(f"[bold]{tenant}[/]: training on its own data ({settings.steps} steps)")
    version = train_adapter(
        home, tenant, dataset="style", adapter=ADAPTER, actor=ACTOR, rank=settings.rank,
        alpha=2 * settings.rank, max_steps=settings.steps, lr=settings.lr, seed=seed,
        model=str(model_dir), promote=promote)
    record = version.training_record
    if record["eval_loss_before"] is not None:
        console.print(f"  {version.label}: held-out loss {record['eval_loss_before']:.2f} (base) "
                      f"-> {record['eval_loss_after']:.2f} in {record['duration_s']} s")
    return version.label


def _serve_and_show(registry, model_dir: Path, settings: DemoSettings,
                    result: DemoResult) -> None:
    import openai

    from loraplex.config import EngineConfig
    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.server.app import ServerSettings, create_app
    from loraplex.server.thread import ServerThread
    from loraplex.validation import adapter_validator

    fix = "see the error above; `loraplex serve` runs the same server on its own"
    with step(4, "starting the server with a key per tenant", fix):
        engine = AsyncEngine(EngineConfig(model=str(model_dir), max_loras=4, max_cpu_loras=8,
                                          max_lora_rank=max(16, settings.rank)))
        app = create_app(engine, registry, ServerSettings(base_model_name=model_dir.name),
                         adapter_validator(str(model_dir)))
        # Keys for this run only (only their hashes are stored); revoked when it ends.
        keys = {tenant: registry.create_key(tenant, actor=ACTOR) for tenant in TENANTS}
        admin_id, admin_key = registry.create_admin_key(actor=ACTOR)
    try:
        with ServerThread(app) as url:
            console.print(f"serving on {url}; asking: [italic]{QUESTION}[/]")
            clients = {tenant: openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
                       for tenant, (_, key) in keys.items()}
            with step(4, "the same question from all three tenants, at once", fix):
                result.answers = _ask_all(clients, settings.max_tokens)
                _show_answers(result.answers)
            with step(5, f"v2 for the {V2_TENANT}, an 80/20 split, rollback", fix):
                _ab_test(registry, model_dir, settings, clients[V2_TENANT], result)
            with step(6, f"exporting {settings.export_tenant}'s model as GGUF",
                      "free disk space, or delete the old export, then rerun"):
                result.export_path = _export(registry, model_dir, settings)
            with step(7, "adapter cache statistics and where everything lives", fix):
                headers = {"authorization": f"Bearer {admin_key}"}
                result.engine_stats = httpx.get(f"{url}/admin/engine", headers=headers,
                                                timeout=30).json()
                _show_where(registry, model_dir, result)
    finally:
        for key_id, _ in keys.values():
            registry.revoke_key(key_id, actor=ACTOR)
        registry.revoke_key(admin_id, actor=ACTOR)
    console.print("[bold green]server stopped; the demo is done.[/] Run it again: it reuses "
                  "what exists.")


def _ask_all(clients: dict, max_tokens: int) -> dict[str, str]:
    """The same question from all tenants at once: the engine batches their adapters."""
    def ask(tenant: str) -> str:
        reply = clients[tenant].chat.completions.create(
            model=ADAPTER, messages=[{"role": "user", "content": QUESTION}],
            max_tokens=max_tokens, temperature=0)
        return reply.choices[0].message.content.strip()

    with ThreadPoolExecutor(len(clients)) as pool:
        return dict(zip(clients, pool.map(ask, clients), strict=True))


def _show_answers(answers: dict[str, str]) -> None:
    table = Table(*(f"{tenant} ({TENANTS[tenant][0]})" for tenant in answers),
                  show_lines=True)
    table.add_row(*answers.values())
    marks = []
    for tenant, answer in answers.items():
        frame = TENANTS[tenant][2]
        ok = answer.startswith(frame)
        marks.append(("[green]OK[/] " if ok else "[yellow]not yet[/] ") + f"starts {frame!r}")
    table.add_row(*marks)
    console.print(table)


def _ab_test(registry, model_dir: Path, settings: DemoSettings, client,
             result: DemoResult) -> None:
    info = registry.show_adapter(V2_TENANT, ADAPTER)
    if len(info.versions) < 2:
        label = _train(registry.home, V2_TENANT, model_dir, settings, seed=1, promote=False)
        result.trained.append(f"{V2_TENANT}/{ADAPTER}@{label}")
    split = registry.split(V2_TENANT, ADAPTER, {1: 80, 2: 20}, actor=ACTOR)
    console.print(f"split: {_split_text(split)}; {SPLIT_REQUESTS} customers ask once each")
    served = Counter()
    for i in range(SPLIT_REQUESTS):
        # `user` keeps a customer on one version (sticky), so customers spread 80/20.
        reply = client.chat.completions.with_raw_response.create(
            model=ADAPTER, messages=[{"role": "user", "content": "Any deals today?"}],
            max_tokens=8, temperature=0, user=f"customer-{i}")
        served[reply.headers["x-loraplex-adapter-version"]] += 1
    result.split_served = dict(sorted(served.items()))
    table = Table("version", "requests (all runs)", "this run", "errors")
    for row in registry.version_stats(V2_TENANT, ADAPTER):
        table.add_row(row["version"], str(row["requests"]), str(served[row["version"]]),
                      str(row["errors"]))
    console.print(table)
    result.split_after_rollback = registry.rollback(V2_TENANT, ADAPTER, actor=ACTOR)
    console.print(f"rolled back: {_split_text(result.split_after_rollback)}")


def _split_text(split: dict[int, int]) -> str:
    return " ".join(f"v{n}={w}%" for n, w in sorted(split.items()))


def _export(registry, model_dir: Path, settings: DemoSettings) -> Path:
    from loraplex.export.gguf import export_merged
    from loraplex.vault.artifacts import ArtifactSealer, materialized

    tenant = settings.export_tenant
    version = registry.get_version(tenant, ADAPTER, registry.show_adapter(tenant, ADAPTER).active)
    name = f"{tenant}-{ADAPTER}-{version.label}.{settings.export_dtype}.gguf"
    out = registry.home / "exports" / name
    if out.exists():
        console.print(f"{out} exists, reused")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = ArtifactSealer.for_home(registry.home).reader(tenant, version.artifact_path)
    with materialized(reader) as adapter_dir:  # a private, decrypted copy (export reads a dir)
        exported = export_merged(model_dir, out, settings.export_dtype, adapter_dir,
                                 name=f"{model_dir.name}+{tenant}/{ADAPTER}@{version.label}")
    registry.record_audit(ACTOR, "export.gguf", f"{tenant}/{ADAPTER}",
                          {"dtype": settings.export_dtype, "version": version.label,
                           "out": str(out)}, tenant=tenant)
    console.print(f"wrote {out} ({exported.num_bytes / 1e6:.0f} MB) and "
                  f"{exported.modelfile_path.name}: `ollama create {tenant} -f "
                  f"{exported.modelfile_path}` or `llama-cli -m {out}`")
    return out


def _show_where(registry, model_dir: Path, result: DemoResult) -> None:
    from loraplex.registry.artifacts import ARTIFACTS_DIR
    from loraplex.registry.db import DB_FILE
    from loraplex.vault.store import VAULT_DIR

    stats = result.engine_stats
    console.print(f"slots hold {len(stats['adapters_in_slots'])} adapters, the host cache "
                  f"{len(stats['adapters_in_host_cache'])}; slot hits {stats['slot_hits']}, "
                  f"misses {stats['slot_misses']}; adapter load p50 "
                  f"{stats['adapter_load_ms_p50'] or 0:.1f} ms")
    home = registry.home
    table = Table("what", "where")
    for what, where in [
        ("base model", model_dir),
        ("registry: tenants, keys, versions, splits, audit", home / DB_FILE),
        ("adapter versions (immutable, by sha256)", home / ARTIFACTS_DIR),
        ("encrypted datasets", home / VAULT_DIR),
        ("GGUF export + Modelfile", result.export_path),
    ]:
        table.add_row(what, str(where))
    console.print(table)


def main(
    model: Annotated[str, typer.Option(help="Default model name or checkpoint dir")] = (
        "smollm2-135m"),
    steps: Annotated[int, typer.Option(help="Training steps per adapter")] = 30,
    home: Annotated[Path | None, typer.Option(help="Default: <loraplex home>/demo")] = None,
):
    """Run the agency demo."""
    run_demo(DemoSettings(model=model, steps=steps, home=home))


if __name__ == "__main__":
    typer.run(main)
