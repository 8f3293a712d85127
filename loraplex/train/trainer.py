"""Fine-tune a LoRA adapter for one tenant on one of its vault datasets; register the result.

A plain training loop over transformers' model with PEFT's LoRA layers: AdamW, a fixed seed
for the LoRA initialisation, the held-out split and the shuffling, and no dropout, so a seed
gives the same weights on CPU. The dataset is decrypted in memory and never written anywhere;
the trained adapter's plain files exist only between saving and registering it (sealed), in a
private temp directory (0700, in RAM where /dev/shm exists: vault/artifacts.py) removed on the
way out. Ctrl-C or SIGTERM unwinds like an exception (so that directory is removed) and
registers nothing; SIGKILL during training leaves nothing on disk.
"""

from __future__ import annotations

import math
import resource
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loraplex.lora.modules import TARGET_MODULES
from loraplex.model.families import peft_target_modules
from loraplex.model.pull import resolve_model
from loraplex.model.tokenizer import Tokenizer
from loraplex.registry import Registry, Version
from loraplex.registry.tenants import check_name
from loraplex.train.data import IGNORE, Example, TrainingError, build_examples, collate, split
from loraplex.validation import adapter_validator
from loraplex.vault import Vault
from loraplex.vault.artifacts import (
    ArtifactSealer,
    SealedArtifact,
    materialized,
    private_temp_root,
)

MAX_LENGTH = 1024  # tokens per example; longer conversations are cut

# on_progress(phase, step, num_steps, loss): phases "loading", "training", "evaluating",
# "registering"; loss is the last training step's (None before the first step).
ProgressCallback = Callable[[str, int, int, float | None], None]
# on_checkpoint(step, train_loss, eval_loss) at the end of each epoch and at the last step;
# eval_loss is None without held-out examples.
CheckpointCallback = Callable[[int, float, float | None], None]


def train_adapter(
    home: Path,
    tenant: str,
    *,
    dataset: str,
    adapter: str,
    actor: str,
    dataset_version: int | None = None,
    rank: int = 16,
    alpha: float = 32,
    targets: Sequence[str] = TARGET_MODULES,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 2e-4,
    batch_size: int = 4,
    seed: int = 0,
    model: str = "smollm2-135m",
    promote: bool = False,
    progress: bool = True,
    eval_fraction: float = 0.1,
    eval_dataset: str | None = None,
    init_adapter: str | None = None,
    on_progress: ProgressCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
) -> Version:
    """Train a LoRA on the tenant's `dataset` (latest version unless dataset_version) and push
    it as the next version of its adapter `adapter`, with a training record.

    max_steps, when given, is the number of optimizer steps, cycling through the data as often
    as needed (epochs is then ignored). `model` is a default model name or a checkpoint dir.
    The held-out examples are `eval_dataset` (another of the tenant's datasets, latest
    version) when given, else an `eval_fraction` of `dataset`. `init_adapter`, the artifact
    dir of one of the tenant's versions, continues training that adapter (its rank, alpha and
    targets replace the arguments). The new version serves only if promote=True (or if it is
    the adapter's first version).
    """
    check_name("adapter", adapter)
    check_hyperparameters(rank, alpha, targets, epochs, max_steps, lr, batch_size, eval_fraction)
    report = on_progress or (lambda phase, step, num_steps, loss: None)
    sealer = ArtifactSealer.for_home(home)
    with Vault(home) as vault:  # fail on a missing tenant or dataset before loading a model
        dataset_info = vault.get(tenant, dataset, dataset_version)
        records = vault.read(tenant, dataset, dataset_info.number)
        eval_records = None if eval_dataset is None else vault.read(tenant, eval_dataset)
    model_dir = resolve_model(model)
    tokenizer = Tokenizer(model_dir)
    examples = build_examples(tokenizer, records, MAX_LENGTH)
    if eval_records is None:
        train_indices, eval_indices = split(len(examples), eval_fraction, seed)
        train_set = [examples[i] for i in train_indices]
        eval_set = [examples[i] for i in eval_indices]
    else:
        train_set, eval_set = examples, build_examples(tokenizer, eval_records, MAX_LENGTH)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    num_steps = max_steps or epochs * steps_per_epoch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    started = time.monotonic()
    # transformers' deprecation notices about its own internals (raised from PEFT's calls) say
    # nothing a user can act on.
    with _sigterm_raises_keyboard_interrupt(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        report("loading", 0, num_steps, None)
        init = None if init_adapter is None else sealer.reader(tenant, init_adapter)
        peft_model = _lora_model(model_dir, rank, alpha, targets, seed, init)
        peft_model = peft_model.to(device)
        if init_adapter is not None:  # what the record says must be what was trained
            lora = peft_model.peft_config["default"]
            rank, alpha, targets = lora.r, lora.lora_alpha, sorted(lora.target_modules)
        report("evaluating", 0, num_steps, None)
        eval_before = _eval_loss(peft_model, eval_set, batch_size, device)

        def at_step(step: int, loss: float) -> None:
            """A checkpoint's metrics at each epoch's end and at the last step."""
            if on_checkpoint and (step % steps_per_epoch == 0 or step == num_steps):
                on_checkpoint(step, loss, _eval_loss(peft_model, eval_set, batch_size, device))
                peft_model.train()

        train_losses, trained_tokens = _train(peft_model, train_set, num_steps, lr, batch_size,
                                              seed, device, progress, report, at_step)
        report("evaluating", num_steps, num_steps, train_losses[-1])
        eval_after = _eval_loss(peft_model, eval_set, batch_size, device)
        record = {
            "dataset": {"name": dataset, "version": dataset_info.label,
                        "sha256": dataset_info.sha256, "records": dataset_info.num_records},
            "eval_dataset": eval_dataset,
            "continued_from": init_adapter is not None,
            "base_model": model,
            "hyperparameters": {
                "rank": rank, "alpha": alpha, "targets": list(targets), "epochs": epochs,
                "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                "eval_fraction": eval_fraction, "max_length": MAX_LENGTH,
            },
            "num_train_examples": len(train_set),
            "num_eval_examples": len(eval_set),
            "steps": num_steps,
            "trained_tokens": trained_tokens,  # every token of every training batch
            "train_losses": train_losses,  # one per step
            "eval_loss_before": eval_before,  # the base model's: LoRA starts as a no-op
            "eval_loss_after": eval_after,
            "duration_s": round(time.monotonic() - started, 1),
            "device": str(device),
            "peak_memory_mb": _peak_memory_mb(device),
        }
        report("registering", num_steps, num_steps, train_losses[-1])
        private = tempfile.TemporaryDirectory(prefix="loraplex-train-", dir=private_temp_root())
        with private as tmp, Registry(home) as reg:
            peft_model.save_pretrained(tmp, safe_serialization=True)
            return reg.push_version(tenant, adapter, Path(tmp), actor=actor,
                                    validate=adapter_validator(model), sealer=sealer,
                                    promote=promote,
                                    training_record=record)


def check_hyperparameters(rank, alpha, targets, epochs, max_steps, lr, batch_size,
                          eval_fraction) -> None:
    """Raise TrainingError naming the first bad hyperparameter (checked before any work)."""
    checks = [
        (rank >= 1, f"rank must be at least 1, got {rank}"),
        (alpha > 0, f"alpha must be positive, got {alpha}"),
        (epochs >= 1, f"epochs must be at least 1, got {epochs}"),
        (max_steps is None or max_steps >= 1, f"max_steps must be at least 1, got {max_steps}"),
        (lr > 0, f"lr must be positive, got {lr}"),
        (batch_size >= 1, f"batch_size must be at least 1, got {batch_size}"),
        (0 <= eval_fraction < 1, f"eval_fraction must be in [0, 1), got {eval_fraction}"),
        (len(targets) > 0 and set(targets) <= set(TARGET_MODULES),
         f"targets must be some of {', '.join(TARGET_MODULES)}; got {', '.join(targets)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)


def _lora_model(model_dir: Path, rank: int, alpha: float, targets: Sequence[str], seed: int,
                init_adapter: SealedArtifact | None = None):
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    # Our own progress bar says what is happening; transformers' weight-loading bar would only
    # interleave with it.
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if init_adapter is not None:
        # PEFT reads a directory; it loads the weights before the decrypted copy is removed.
        with materialized(init_adapter) as init_dir:
            return PeftModel.from_pretrained(base, init_dir, is_trainable=True)
    config = LoraConfig(r=rank, lora_alpha=alpha,
                        target_modules=peft_target_modules(model_dir, targets),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # LoRA's A matrices are drawn here (B starts at zero)
    return get_peft_model(base, config)


def _train(model, train_set: list[Example], num_steps: int, lr: float, batch_size: int,
           seed: int, device: torch.device, progress: bool, report: ProgressCallback,
           at_step: Callable[[int, float], None]) -> tuple[list[float], int]:
    """Run num_steps AdamW steps; returns the loss of each step and the tokens trained on."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    losses, trained_tokens = [], 0
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("train", total=num_steps, loss="-")
        for batch in _batches(train_set, batch_size, seed, num_steps):
            loss_sum, num_tokens = _loss(model, batch, device)
            loss = loss_sum / max(num_tokens, 1)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            losses.append(round(loss.item(), 4))
            trained_tokens += int(batch["attention_mask"].sum())
            bar.update(task, advance=1, loss=f"{losses[-1]:.3f}")
            report("training", len(losses), num_steps, losses[-1])
            at_step(len(losses), losses[-1])
    model.eval()
    return losses, trained_tokens


def _batches(examples: list[Example], batch_size: int, seed: int, num_steps: int
             ) -> Iterator[dict[str, torch.Tensor]]:
    """num_steps batches, each epoch in a new seeded order (the last batch of one may be short)."""
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            if step == num_steps:
                return
            yield collate([examples[i] for i in order[start:start + batch_size]])
            step += 1


@torch.no_grad()
def _eval_loss(model, examples: list[Example], batch_size: int, device: torch.device
               ) -> float | None:
    """Mean loss per assistant token over the held-out examples (None when there are none)."""
    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss_sum, num_tokens = _loss(model, collate(examples[start:start + batch_size]), device)
        total += loss_sum.item()
        count += num_tokens
    return round(total / max(count, 1), 4)


def _loss(model, batch: dict[str, torch.Tensor], device: torch.device
          ) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the batch's target tokens, how many there are)."""
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    # Position t predicts token t + 1. The vocabulary projection runs on target positions only:
    # on the context it would be a fifth of the compute (and most of the memory) for nothing.
    targets = batch["labels"][:, 1:]
    is_target = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][is_target])
    loss_sum = F.cross_entropy(logits.float(), targets[is_target], reduction="sum")
    return loss_sum, int(is_target.sum())


def _peak_memory_mb(device: torch.device) -> int:
    """Peak memory of this process: device memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


@contextmanager
def _sigterm_raises_keyboard_interrupt() -> Iterator[None]:
    """Make SIGTERM (a stopped container, `kill`) unwind like Ctrl-C, so `finally` blocks and
    context managers clean up. Signal handlers can only be set from the main thread; elsewhere
    the process's own handling stays as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
