"""Training on the tiny model: determinism, the training record, errors, the CLI, interruption."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.registry import NotFound, Registry
from loraplex.train import TrainingError, train_adapter
from loraplex.vault import DatasetNotFound
from tests.train.conftest import SECRET

FAST = {"rank": 4, "alpha": 8, "max_steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False}


def train(home, model_dir, **kwargs):
    options = {**FAST, "dataset": "greetings", "adapter": "bot", "actor": "alice", **kwargs}
    return train_adapter(home, "acme", model=str(model_dir), **options)


def test_same_seed_same_weights(home, tiny_llama_dir):
    v1 = train(home, tiny_llama_dir, seed=1)
    v2 = train(home, tiny_llama_dir, seed=1)
    v3 = train(home, tiny_llama_dir, seed=2)
    # Artifacts are content-addressed: the same sha256 means byte-identical files.
    assert v1.sha256 == v2.sha256 != v3.sha256
    assert v1.training_record["train_losses"] == v2.training_record["train_losses"]


def test_version_and_training_record(home, tiny_llama_dir):
    v1 = train(home, tiny_llama_dir, targets=["q_proj", "v_proj"], eval_fraction=0.25)
    assert (v1.label, v1.rank, v1.target_modules, v1.created_by) == (
        "v1", 4, ("q_proj", "v_proj"), "alice")
    record = v1.training_record
    assert record["dataset"]["name"] == "greetings" and record["dataset"]["version"] == "v1"
    assert len(record["dataset"]["sha256"]) == 64 and record["dataset"]["records"] == 12
    assert record["hyperparameters"]["targets"] == ["q_proj", "v_proj"]
    assert (record["num_train_examples"], record["num_eval_examples"]) == (9, 3)
    assert record["steps"] == 3 and len(record["train_losses"]) == 3
    assert record["eval_loss_after"] < record["eval_loss_before"]
    assert record["device"] == "cpu" and record["duration_s"] >= 0
    # The first version serves at once (the registry's rule); later ones only when promoted.
    train(home, tiny_llama_dir)
    with Registry(home) as registry:
        assert registry.show_adapter("acme", "bot").active == 1
    train(home, tiny_llama_dir, promote=True)
    with Registry(home) as registry:
        assert registry.show_adapter("acme", "bot").active == 3


def test_epochs_set_the_steps_without_max_steps(home, tiny_llama_dir):
    version = train(home, tiny_llama_dir, max_steps=None, epochs=2, eval_fraction=0)
    record = version.training_record
    assert record["steps"] == 6  # 12 examples, batches of 4, twice
    assert record["eval_loss_before"] is None and record["eval_loss_after"] is None


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"dataset": "nope"}, DatasetNotFound, "tenant 'acme' has no dataset 'nope'"),
    ({"dataset_version": 2}, DatasetNotFound, "no dataset 'greetings' v2"),
    ({"targets": ["q_proj", "lm_head"]}, TrainingError, "targets must be some of q_proj"),
    ({"rank": 0}, TrainingError, "rank must be at least 1"),
    ({"eval_fraction": 1.0}, TrainingError, "eval_fraction must be in"),
    ({"adapter": "Bad Name"}, ValueError, "invalid adapter name"),
])
def test_bad_requests_fail_before_training(home, tmp_path, options, error, message):
    # The model dir does not exist: each error must come before it is needed.
    with pytest.raises(error, match=message):
        train(home, tmp_path / "no-model", **options)
    with Registry(home) as registry, pytest.raises(NotFound):
        registry.show_adapter("acme", "bot")


def test_cli(home, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "acme", "--dataset", "greetings", "--adapter", "bot",
                                 "--model", str(tiny_llama_dir), "--rank", "4", "--max-steps",
                                 "2", "--targets", "q_proj,v_proj", "--eval-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    assert "bot v1 (id 1" in result.output and "trained on greetings v1" in result.output
    assert "held-out loss: " in result.output and "(base) -> " in result.output
    with Registry(home) as registry:
        assert registry.get_version("acme", "bot", 1).target_modules == ("q_proj", "v_proj")
    result = runner.invoke(app, ["train", "acme", "--dataset", "nope", "--adapter", "bot"])
    assert result.exit_code == 1 and "has no dataset 'nope'" in result.output
    assert "Traceback" not in result.output


STOPPABLE_TRAINING = """
import os
import sys
import time
from pathlib import Path

import torch

import loraplex.vault.artifacts
from loraplex.registry import Registry
from loraplex.train import train_adapter

home, model, phase, started = sys.argv[1:]
# The trained adapter's private temp dir goes to RAM (/dev/shm) where there is one: here, to the
# test's own dir, so the test can see it and check it is removed.
loraplex.vault.artifacts.RAM_DIR = Path(os.environ["TMPDIR"])
step, push = torch.optim.AdamW.step, Registry.push_version


def step_and_tell(self, *args, **kwargs):
    Path(started).touch()
    return step(self, *args, **kwargs)


def tell_and_wait(self, *args, **kwargs):  # the adapter is saved in its temp dir by now
    Path(started).touch()
    time.sleep(600)
    return push(self, *args, **kwargs)


if phase == "training":
    torch.optim.AdamW.step = step_and_tell
else:
    Registry.push_version = tell_and_wait
train_adapter(Path(home), "acme", dataset="greetings", adapter="bot", model=model,
              max_steps=1_000_000 if phase == "training" else 1, rank=4, alpha=8,
              actor="alice", progress=False)
"""


@pytest.mark.parametrize(("phase", "signum"), [
    ("training", signal.SIGINT),
    ("training", signal.SIGTERM),
    ("training", signal.SIGKILL),  # nothing is on disk during training, so even this is clean
    ("registering", signal.SIGTERM),
], ids=lambda value: getattr(value, "name", value))
def test_interrupted_training_leaves_nothing(home, tiny_llama_dir, tmp_path, phase, signum):
    tmp = tmp_path / "tmp"  # the job's temp dir, to check it is left empty
    tmp.mkdir()
    started = tmp_path / "started"
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE_TRAINING, str(home), str(tiny_llama_dir), phase,
         str(started)],
        env={**os.environ, "TMPDIR": str(tmp)}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        if phase == "registering":
            [private] = tmp.iterdir()  # the adapter is in its temp dir now, private to us
            assert private.name.startswith("loraplex-train-")
            assert stat.S_IMODE(private.stat().st_mode) == 0o700
        process.send_signal(signum)
        stderr = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    assert process.returncode != 0
    if signum != signal.SIGKILL:
        assert "KeyboardInterrupt" in stderr
    with Registry(home) as registry, pytest.raises(NotFound):
        registry.show_adapter("acme", "bot")
    assert list(tmp.iterdir()) == [] and not (home / "artifacts").exists()
    # The dataset's plaintext was never written anywhere (home and tmp are under tmp_path).
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
