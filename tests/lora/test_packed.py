"""The ready-to-serve adapter cache: a second load reads it, and anything off falls back to
loading (or refusing) the adapter itself."""

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraplex.lora.adapter as adapter_module
import loraplex.lora.packed as packed
from loraplex.lora.adapter import AdapterError, load_adapter
from loraplex.lora.modules import TARGET_MODULES
from tests.conftest import make_peft_adapter, module_shapes, tiny_llama

NUM_LAYERS = 2


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def shapes(base_model):
    return module_shapes(base_model)


@pytest.fixture(scope="module")
def source(base_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("source")
    # rank 8 with a smaller rank on one module of one layer: per-layer ranks must survive
    make_peft_adapter(base_model, path, r=8, lora_alpha=16, target_modules=TARGET_MODULES,
                      rank_pattern={"model.layers.1.mlp.down_proj": 4})
    return path


@pytest.fixture
def adapter(source, tmp_path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "adapter"))


def load(path, shapes, cache_dir, **overrides):
    kwargs = dict(num_layers=NUM_LAYERS, module_shapes=shapes, max_rank=16, cache_dir=cache_dir)
    return load_adapter(path, **(kwargs | overrides))


def assert_same(got, want):
    assert got.rank == want.rank and got.target_modules == want.target_modules
    assert got.layer_ranks == want.layer_ranks
    for module, (a, b) in want.modules.items():
        assert torch.equal(got.modules[module][0], a) and torch.equal(got.modules[module][1], b)


def entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.safetensors"))


def test_second_load_reads_the_cache_only(adapter, shapes, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load(adapter, shapes, cache)
    assert len(entries(cache)) == 1
    assert first.layer_ranks["down_proj"] == (8, 4)

    def no_parsing(*args):
        raise AssertionError("parsed the PEFT files again")

    monkeypatch.setattr(adapter_module, "_load", no_parsing)
    second = load(adapter, shapes, cache)
    assert_same(second, first)
    assert second.path == adapter
    # Exactly what the regular loader gives, per (layer, module), at each layer's own rank.
    monkeypatch.undo()
    plain = dict(load(adapter, shapes, None).pairs())
    cached = dict(second.pairs())
    assert plain.keys() == cached.keys()
    assert all(torch.equal(plain[k][0], cached[k][0]) and torch.equal(plain[k][1], cached[k][1])
               for k in plain)


def test_each_dtype_and_each_edit_of_the_files_has_its_own_entry(adapter, shapes, tmp_path):
    cache = tmp_path / "cache"
    load(adapter, shapes, cache)
    half = load(adapter, shapes, cache, dtype=torch.bfloat16)
    assert half.modules["q_proj"][0].dtype == torch.bfloat16 and len(entries(cache)) == 2

    weights_file = adapter / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    key = next(k for k in tensors if "q_proj.lora_B" in k)
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, weights_file)
    stat = weights_file.stat()
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    edited = load(adapter, shapes, cache)
    fresh = load(adapter, shapes, None)
    assert torch.equal(edited.modules["q_proj"][1], fresh.modules["q_proj"][1])
    assert len(entries(cache)) == 3


@pytest.mark.parametrize("damage", ["garbage", "nan", "wrong shape", "flipped value"])
def test_a_damaged_entry_is_ignored_and_rewritten(adapter, shapes, tmp_path, damage):
    cache = tmp_path / "cache"
    want = load(adapter, shapes, cache)
    [entry] = entries(cache)
    if damage == "garbage":
        entry.write_bytes(b"not a safetensors file")
    else:
        from safetensors import safe_open

        with safe_open(entry, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        if damage == "nan":
            tensors["v_proj.lora_a"][0, 0, 0] = float("nan")
        elif damage == "flipped value":  # passes every shape check: the checksum must catch it
            tensors["v_proj.lora_a"][0, 0, 0] += 1.0
        else:
            tensors["v_proj.lora_a"] = tensors["v_proj.lora_a"][:, :, :-1].contiguous()
        save_file(tensors, entry, metadata=metadata)
    assert_same(load(adapter, shapes, cache), want)
    assert_same(load(adapter, shapes, cache), want)  # rewritten: readable again


def test_a_cached_adapter_above_max_rank_is_still_refused(adapter, shapes, tmp_path):
    cache = tmp_path / "cache"
    load(adapter, shapes, cache)
    with pytest.raises(AdapterError, match="above the configured max_rank 4"):
        load(adapter, shapes, cache, max_rank=4)


def test_least_recently_used_entries_go_past_the_size_limit(source, shapes, tmp_path,
                                                            monkeypatch):
    cache = tmp_path / "cache"
    copies = [Path(shutil.copytree(source, tmp_path / f"a{i}")) for i in range(3)]
    load(copies[0], shapes, cache)
    [entry] = entries(cache)
    monkeypatch.setattr(packed, "MAX_CACHE_BYTES", 2 * entry.stat().st_size)
    load(copies[1], shapes, cache)
    first = {e.name for e in entries(cache)}
    os.utime(entry, ns=(0, 0))  # long unused
    load(copies[1], shapes, cache)  # a read: marks copies[1]'s entry used
    load(copies[2], shapes, cache)  # a third entry: the oldest goes
    assert entry.name not in {e.name for e in entries(cache)}
    assert len(entries(cache)) == 2 and (first - {entry.name}) <= {e.name for e in entries(cache)}


def test_an_unwritable_cache_only_costs_speed(adapter, shapes, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    want = load(adapter, shapes, None)
    assert_same(load(adapter, shapes, blocker / "cache"), want)


def in_memory(adapter: Path):
    """An adapter whose files come from memory, as a sealed registry artifact's do."""
    names = (adapter_module.CONFIG_FILE, adapter_module.WEIGHTS_FILE)
    files = {name: (adapter / name).read_bytes() for name in names}
    return lambda: files


def test_an_adapter_read_from_memory_loads_as_from_its_files(adapter, shapes, tmp_path):
    name = tmp_path / "artifacts" / "acme" / "sha"  # never read: only names it
    got = load(name, shapes, None, read_files=in_memory(adapter))
    assert_same(got, load(adapter, shapes, None))
    assert got.path == name


def test_entries_are_private_and_scoped_to_their_owner(adapter, shapes, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)  # made by an older loraplex, before entries were private
    name = tmp_path / "artifacts" / "acme" / "sha"
    first = load(name, shapes, cache, read_files=in_memory(adapter), cache_scope="acme")
    [entry] = sorted((cache / "acme").glob("*.safetensors"))
    assert entries(cache) == []  # nothing of acme's at the top level
    for directory in (cache, cache / "acme"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    # The next load is from the entry, without decrypting (calling read_files) again.
    def never():
        raise AssertionError("read the artifact again")

    assert_same(load(name, shapes, cache, read_files=never, cache_scope="acme"), first)
    # Eviction sees entries in every scope.
    monkeypatch.setattr(packed, "MAX_CACHE_BYTES", entry.stat().st_size)
    os.utime(entry, ns=(0, 0))
    load(adapter, shapes, cache)
    assert not entry.exists() and len(entries(cache)) == 1


def test_a_loaded_entry_does_not_change_with_its_file(adapter, shapes, tmp_path):
    """The host cache keeps what was read, long after the checksum was checked: it must be a
    copy, not a view of the file (a view served whatever the disk later held, and a file cut
    short under it killed the server with SIGBUS when the slot was filled)."""
    cache = tmp_path / "cache"
    load(adapter, shapes, cache)
    cached = load(adapter, shapes, cache)
    want = {m: (a.clone(), b.clone()) for m, (a, b) in cached.modules.items()}
    [entry] = entries(cache)
    size = entry.stat().st_size
    with open(entry, "r+b") as f:  # in place, as a disk fault would: same inode, same size
        f.seek(size // 2)
        f.write(b"\xff" * (size - size // 2))
    for module, (a, b) in want.items():
        assert torch.equal(cached.modules[module][0], a)
        assert torch.equal(cached.modules[module][1], b)
