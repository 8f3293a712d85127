"""The corruption run's short version (python -m loraplex.faults corrupt runs more rounds): a
serving-cache entry, a sealed artifact and a vault file damaged while the server runs; the
cache entry is rebuilt and answers right, the artifact's and the file's requests fail clearly,
every other tenant is served as before."""

from loraplex.faults.checks import home_problems
from loraplex.faults.corruption import KINDS, NUM_TENANTS, damage, run_corruption
from loraplex.faults.harness import make_home
from loraplex.vault import Vault


def test_two_rounds_of_damage_are_found_and_contained(fault_model, tmp_path):
    report = run_corruption(tmp_path, rounds=2, model_dir=fault_model)  # a flip, then a cut
    print(report.as_dict())
    assert report.problems == []
    twice = dict.fromkeys(KINDS, 2)
    assert report.damaged == report.detected == report.handled == twice
    assert report.repaired == 2
    assert report.others_served == 2 * len(KINDS) * (NUM_TENANTS - 1)
    assert report.ok


def test_the_checks_find_a_cut_vault_file(fault_model, tmp_path):
    """The home check names a vault file cut to half (a damage the run makes)."""
    fh = make_home(tmp_path, 1, fault_model)
    with Vault(fh.home) as vault:
        vault.add("t00", "faq", b'{"messages": [{"role": "user", "content": "hi"}, '
                  b'{"role": "assistant", "content": "hello"}]}\n', actor="test")
    damage(next((fh.home / "vault" / "tenants" / "t00").rglob("*.enc")), "cut")
    problems = home_problems(fh.home)["problems"]
    assert len(problems) == 1 and "dataset t00/faq v1: does not decrypt" in problems[0]
