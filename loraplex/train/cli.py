"""`loraplex train`: fine-tune a tenant's adapter on one of its vault datasets."""

from typing import Annotated

import typer

from loraplex.cli_support import actor, fail

ALL_TARGETS = "all"


def train_command(
    tenant: str,
    dataset: Annotated[str, typer.Option(help="The tenant's dataset in the vault")],
    adapter: Annotated[str, typer.Option(help="The adapter to add a version to")],
    dataset_version: Annotated[int | None, typer.Option(help="Default: the latest")] = None,
    rank: int = 16,
    alpha: float = 32,
    targets: Annotated[str, typer.Option(help="q_proj,v_proj,... or 'all' (all seven)")] = (
        ALL_TARGETS
    ),
    epochs: int = 1,
    max_steps: Annotated[int | None, typer.Option(help="Steps to run; overrides epochs")] = None,
    lr: float = 2e-4,
    batch_size: int = 4,
    seed: int = 0,
    eval_fraction: Annotated[float, typer.Option(help="Share of records held out")] = 0.1,
    promote: Annotated[bool, typer.Option(help="Serve the new version at once")] = False,
    model: Annotated[str, typer.Option(help="Default model name or checkpoint dir")] = (
        "smollm2-135m"
    ),
):
    """Train a LoRA on TENANT's dataset and store it as the adapter's next version."""
    from loraplex.home import loraplex_home
    from loraplex.lora.modules import TARGET_MODULES
    from loraplex.model.pull import PullError
    from loraplex.train import train_adapter

    modules = TARGET_MODULES if targets == ALL_TARGETS else [
        name.strip() for name in targets.split(",") if name.strip()]
    try:
        version = train_adapter(
            loraplex_home(), tenant, dataset=dataset, dataset_version=dataset_version,
            adapter=adapter, rank=rank, alpha=alpha, targets=modules, epochs=epochs,
            max_steps=max_steps, lr=lr, batch_size=batch_size, seed=seed, model=model,
            promote=promote, actor=actor(), eval_fraction=eval_fraction)
    except (ValueError, OSError, PullError) as e:  # each carries a clear message
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: no version was created")
    record = version.training_record
    typer.echo(f"{adapter} {version.label} (id {version.id}, sha256 {version.sha256[:12]}, "
               f"rank {version.rank}) trained on {dataset} {record['dataset']['version']} in "
               f"{record['duration_s']} s on {record['device']}")
    if record["eval_loss_before"] is not None:
        typer.echo(f"held-out loss: {record['eval_loss_before']:.4f} (base) -> "
                   f"{record['eval_loss_after']:.4f} (trained)")
