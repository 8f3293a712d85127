"""The crash run's short version (python -m loraplex.faults crash runs more rounds): SIGKILL
mid-stream, mid-push, mid-promote, mid-training, mid-upload and mid-export; restart; the home
is sound, the job failed with a reason, every tenant is served."""

from loraplex.faults.checks import home_problems
from loraplex.faults.crash import KINDS, run_crash
from loraplex.faults.harness import make_home


def test_one_round_of_kills_leaves_a_sound_home(fault_model, tmp_path):
    report = run_crash(tmp_path, rounds=1, model_dir=fault_model)
    print(report.as_dict())
    assert report.problems == []
    assert report.kills == dict.fromkeys(KINDS, 1) and report.jobs_failed_with_reason == 1
    assert report.ok


def test_the_checks_find_a_partial_write_and_a_damaged_artifact(fault_model, tmp_path):
    """The home checks can fail (a flipped artifact byte); a half-written vault file is swept
    by the first Vault opened on the home, as after a restart."""
    fh = make_home(tmp_path, 1, fault_model)
    assert home_problems(fh.home)["problems"] == []
    partial = fh.home / "vault" / "tenants" / "t00" / "faq" / ".v1.enc.tmp"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x")
    sealed = next((fh.home / "artifacts" / "t00").glob("*/adapter_model.safetensors.sealed"))
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 1
    sealed.write_bytes(bytes(data))
    problems = home_problems(fh.home)["problems"]
    assert len(problems) == 1 and "t00/bot v1: unreadable" in problems[0]
    assert not partial.exists()
