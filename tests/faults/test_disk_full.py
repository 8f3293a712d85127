"""The disk-full run's short version (python -m loraplex.faults disk-full runs more rounds):
the home on a full tmpfs; a push, a dataset upload, a training job, a GGUF export and the
ledger's writes are each refused clearly (507 insufficient_storage, a job failed naming the
full disk), nothing is left half-written, serving goes on; with room again, each succeeds."""

import pytest

from loraplex.faults.checks import home_problems
from loraplex.faults.disk_full import (
    ANSWERS_WHILE_FULL,
    KINDS,
    MountRefused,
    fill,
    partial_files,
    run_disk_full,
    small_filesystem,
)
from loraplex.faults.harness import make_home


def test_one_round_on_a_full_disk_is_refused_cleanly_and_recovers(fault_model, tmp_path):
    try:
        report = run_disk_full(tmp_path, rounds=1, model_dir=fault_model)
    except MountRefused as e:
        pytest.skip(str(e))
    print(report.as_dict())
    assert report.problems == []
    every_kind_once = dict.fromkeys(KINDS, 1)
    assert report.tried == report.refused == report.succeeded_after_freeing == every_kind_once
    assert report.served_while_full == ANSWERS_WHILE_FULL
    assert report.ok


def test_the_checks_find_a_partial_file_on_a_full_disk(fault_model, tmp_path):
    """The filler leaves no byte free, and a temp file left there is found (as is one in the
    vault, which the first Vault opened on the home sweeps)."""
    try:
        with small_filesystem(tmp_path / "small", 4) as small:
            fh = make_home(small, 1, fault_model)
            fill(small / "filler")
            with pytest.raises(OSError):
                (small / "one-more").write_bytes(b"x" * 4096)
            assert home_problems(fh.home)["problems"] == []
            (small / "one-more").unlink(missing_ok=True)
            assert partial_files(small) == []
            partial = fh.home / "exports" / ".bot.gguf.x1.partial"
            partial.parent.mkdir()
            partial.touch()
            assert partial_files(small) == [f"{partial}: a temp or partial file left behind"]
    except MountRefused as e:
        pytest.skip(str(e))
