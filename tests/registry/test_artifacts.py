import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loraplex.registry import CONFIG_FILE, WEIGHTS_FILE, InvalidInput, NotFound, Registry
from loraplex.registry.artifacts import ADAPTER_FILES, PUSH_LOCK_FILE
from loraplex.vault.artifacts import KEY_FILE, SEALED_SUFFIX

from .conftest import fake_validate, write_adapter

REPO_ROOT = Path(__file__).resolve().parents[2]
SEALED_FILES = sorted([KEY_FILE, *(name + SEALED_SUFFIX for name in ADAPTER_FILES)])


def artifact_dirs(home: Path) -> list[Path]:
    """Every artifacts/<tenant>/<sha256> dir."""
    return sorted(path for tenant in (home / "artifacts").iterdir() if tenant.name != ".tmp"
                  for path in tenant.iterdir())


def temp_dirs(home: Path) -> list[Path]:
    return sorted(p for p in (home / "artifacts" / ".tmp").iterdir() if p.name != PUSH_LOCK_FILE)


def files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


def test_only_sealed_files_are_stored_and_they_are_private(push, home):
    version = push()
    assert version.artifact_path == home / "artifacts" / "acme" / version.sha256
    assert sorted(p.name for p in version.artifact_path.iterdir()) == SEALED_FILES
    for path in [version.artifact_path, version.artifact_path.parent]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in version.artifact_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_no_plaintext_of_the_adapter_is_left_anywhere_in_the_home(push, home, tmp_path):
    version = push(seed=5)
    src = write_adapter(tmp_path / "same", seed=5)
    weights = (src / WEIGHTS_FILE).read_bytes()
    needles = [weights[i:i + 32] for i in range(0, len(weights), 512)]
    needles.append((src / CONFIG_FILE).read_bytes())
    stored = files_under(home)
    assert any(path.parent == version.artifact_path for path in stored)
    for path in stored:
        data = path.read_bytes()
        assert not any(needle in data for needle in needles), path


def test_the_reader_gives_back_the_pushed_files(push, sealer, tmp_path):
    version = push(seed=4)
    src = write_adapter(tmp_path / "same", seed=4)
    files = sealer.reader("acme", version.artifact_path)()
    assert files == {name: (src / name).read_bytes() for name in ADAPTER_FILES}


def test_other_files_in_the_source_are_never_opened(registry, acme, sealer, tmp_path,
                                                    monkeypatch):
    src = write_adapter(tmp_path / "src")
    (src / "adapter_model.bin").write_bytes(b"pickle")
    (src / "notes.txt").write_text("x")
    opened = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    registry.push_version("acme", "bot", src, actor="alice", validate=fake_validate,
                          sealer=sealer)
    assert sorted(p.name for p in opened if p.parent == src) == sorted(ADAPTER_FILES)


def test_sha256_is_the_sha256sum_manifest(push, tmp_path):
    version = push(seed=3)
    src = write_adapter(tmp_path / "again", seed=3)
    manifest = "".join(
        f"{hashlib.sha256((src / name).read_bytes()).hexdigest()}  {name}\n"
        for name in ADAPTER_FILES
    )
    assert version.sha256 == hashlib.sha256(manifest.encode()).hexdigest()


def test_same_content_twice_shares_one_artifact_within_a_tenant(home, push):
    first = push(seed=1)
    second = push(seed=1)
    other = push(seed=2)
    assert (first.number, second.number) == (1, 2)
    assert first.id != second.id
    assert first.sha256 == second.sha256 != other.sha256
    assert first.artifact_path == second.artifact_path
    assert artifact_dirs(home) == sorted([first.artifact_path, other.artifact_path])
    assert temp_dirs(home) == []


def test_two_tenants_with_identical_bytes_get_their_own_artifacts(registry, home, push, sealer):
    registry.create_tenant("beta", actor="operator")
    mine, theirs = push(seed=1), push(seed=1, tenant="beta")
    assert mine.sha256 == theirs.sha256
    assert mine.artifact_path.parent.name == "acme" and theirs.artifact_path.parent.name == "beta"
    # Sealed under each tenant's key: a sealed file moved into the other's dir is refused.
    for name in ADAPTER_FILES:
        sealed = name + SEALED_SUFFIX
        (theirs.artifact_path / sealed).write_bytes((mine.artifact_path / sealed).read_bytes())
    with pytest.raises(ValueError, match="fails its integrity check"):
        sealer.reader("beta", theirs.artifact_path)()


def test_validate_sees_the_files_in_memory(registry, acme, sealer, tmp_path):
    src = write_adapter(tmp_path / "src")
    seen = []

    def validate(files):
        seen.append(dict(files))
        return fake_validate(files)

    registry.push_version("acme", "bot", src, actor="alice", validate=validate, sealer=sealer)
    assert seen == [{name: (src / name).read_bytes() for name in ADAPTER_FILES}]


def test_refused_by_validate(registry, home, acme, sealer, tmp_path):
    def refuse(files):
        raise ValueError("adapter_model.safetensors: rank 64 exceeds max_lora_rank 16")

    src = write_adapter(tmp_path / "src")
    with pytest.raises(
        InvalidInput, match="^adapter_model.safetensors: rank 64 exceeds max_lora_rank 16$"
    ):
        registry.push_version("acme", "bot", src, actor="alice", validate=refuse, sealer=sealer)
    assert registry.list_adapters("acme") == []
    assert not (home / "artifacts").exists()


@pytest.mark.parametrize("missing", ADAPTER_FILES)
def test_missing_file(registry, home, acme, sealer, tmp_path, missing):
    src = write_adapter(tmp_path / "src")
    (src / missing).unlink()
    with pytest.raises(InvalidInput, match=f"^{src} has no {missing}$"):
        registry.push_version("acme", "bot", src, actor="alice", validate=fake_validate,
                              sealer=sealer)
    assert registry.list_adapters("acme") == []
    assert not (home / "artifacts").exists()


@pytest.mark.parametrize("linked", ADAPTER_FILES)
def test_symlinks_are_refused(registry, acme, sealer, tmp_path, linked):
    real = write_adapter(tmp_path / "real")
    src = write_adapter(tmp_path / "src")
    (src / linked).unlink()
    (src / linked).symlink_to(real / linked)
    with pytest.raises(InvalidInput, match="is a symlink"):
        registry.push_version("acme", "bot", src, actor="alice", validate=fake_validate,
                              sealer=sealer)


def test_not_a_regular_file(registry, acme, sealer, tmp_path):
    src = write_adapter(tmp_path / "src")
    (src / WEIGHTS_FILE).unlink()
    (src / WEIGHTS_FILE).mkdir()
    with pytest.raises(InvalidInput, match="is not a regular file"):
        registry.push_version("acme", "bot", src, actor="alice", validate=fake_validate,
                              sealer=sealer)


@pytest.mark.parametrize("make", ["missing", "file"])
def test_source_is_not_a_directory(registry, acme, sealer, tmp_path, make):
    src = tmp_path / "src"
    if make == "file":
        src.write_text("{}")
    with pytest.raises(InvalidInput, match=f"^{src} is not a directory$"):
        registry.push_version("acme", "bot", src, actor="alice", validate=fake_validate,
                              sealer=sealer)


def test_abandoned_temp_dirs_are_removed_when_no_push_is_in_progress(home, push):
    push(seed=1)
    tmp_root = home / "artifacts" / ".tmp"
    leftover = tmp_root / "push-dead"
    leftover.mkdir()
    (leftover / KEY_FILE).write_bytes(b"x")
    # A push in progress in another process holds the lock shared: nothing is swept then.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_PUSH_LOCK, str(tmp_root / PUSH_LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        Registry(home).close()
        assert temp_dirs(home) == [leftover]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    Registry(home).close()  # opening the registry sweeps (the server does at start)
    assert temp_dirs(home) == []
    leftover.mkdir()
    push(seed=2)  # and so does a push
    assert temp_dirs(home) == []


HOLD_PUSH_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(60)
"""


# Pushes, then hangs at `stage` so the test can SIGKILL it there:
#   validate: files read into memory, nothing written yet;
#   insert: artifact sealed and renamed into place, version row not yet written (write lock held).
CRASHING_PUSH = """
import sys, time
from pathlib import Path
from loraplex.registry import Registry, adapters
from loraplex.vault.artifacts import ArtifactSealer

home, src, stage, ready = sys.argv[1:]

def hang(*args, **kwargs):
    Path(ready).touch()
    time.sleep(60)

def validate(files):
    if stage == "validate":
        hang()
    return {"rank": 8, "target_modules": ["q_proj"]}

if stage == "insert":
    adapters.insert_version = hang
Registry(Path(home)).push_version("acme", "bot", Path(src), actor="alice", validate=validate,
                                  sealer=ArtifactSealer.for_home(home))
"""


@pytest.mark.parametrize("stage", ["validate", "insert"])
def test_a_push_killed_midway_leaves_no_version(registry, home, acme, sealer, tmp_path, stage):
    src = write_adapter(tmp_path / "src", num_bytes=1 << 20)
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PUSH, str(home), str(src), stage, str(ready)],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the push never reached its hanging point"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()

    assert registry.list_adapters("acme") == []
    with pytest.raises(NotFound):
        registry.resolve(acme.id, "bot", "user-1")
    published = artifact_dirs(home) if (home / "artifacts").exists() else []
    assert len(published) == (0 if stage == "validate" else 1)

    # The home is fully usable: the same push now succeeds (reusing a published artifact).
    version = registry.push_version("acme", "bot", src, actor="alice", validate=fake_validate,
                                    sealer=sealer)
    assert version.number == 1
    assert registry.resolve(acme.id, "bot", "user-1").version_id == version.id
    assert artifact_dirs(home) == [version.artifact_path]
    assert sealer.reader("acme", version.artifact_path)()[WEIGHTS_FILE] == (
        src / WEIGHTS_FILE).read_bytes()
    with Registry(home) as fresh:
        assert [v.number for v in fresh.show_adapter("acme", "bot").versions] == [1]


def test_concurrent_pushes_of_the_same_content(registry, home, acme, sealer, tmp_path):
    sources = [write_adapter(tmp_path / f"src-{i}", seed=1) for i in range(4)]
    versions = []

    def push(src):
        versions.append(registry.push_version("acme", "bot", src, actor="alice",
                                              validate=fake_validate, sealer=sealer))

    threads = [threading.Thread(target=push, args=(src,)) for src in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(v.number for v in versions) == [1, 2, 3, 4]
    assert len({v.artifact_path for v in versions}) == 1
    assert artifact_dirs(home) == [versions[0].artifact_path] and temp_dirs(home) == []
