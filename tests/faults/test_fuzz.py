"""The fuzzing's short version (`run_fuzz` runs the long one): the adapter upload and dataset
parsers answer bad input with their typed error and good input with success; the fuzzer itself
reports an unexpected exception and a hang."""

import pytest
from hypothesis import strategies as st

from loraplex.faults import fuzz
from loraplex.faults.fuzz import ACCEPTED, REFUSED, Target, fuzz_target
from loraplex.faults.fuzz_adapters import adapter_targets
from loraplex.faults.fuzz_datasets import dataset_targets

EXAMPLES = 150  # per target: a few seconds each on 2 cores


@pytest.mark.parametrize("targets", [adapter_targets, dataset_targets], ids=lambda f: f.__name__)
def test_file_parsers_survive_a_short_fuzz(fault_model, targets):
    for target in targets(fault_model):
        report = fuzz_target(target, EXAMPLES, 0)
        print(target.name, vars(report))
        assert report.failures == [], "\n\n".join(report.failures)
        assert report.inputs == EXAMPLES and report.accepted > 0 and report.refused > 0


def test_the_fuzzer_reports_an_unexpected_exception_and_a_hang(monkeypatch):
    def parse(value: int) -> str:
        if value == 7:
            raise TypeError("not a typed error")
        return ACCEPTED if value % 2 else REFUSED

    report = fuzz_target(Target("crashes", st.integers(0, 10), parse), 200, 0)
    assert len(report.failures) == 1 and "TypeError: not a typed error" in report.failures[0]

    def hang(value: int) -> str:
        while value == 3:
            pass
        return ACCEPTED

    monkeypatch.setattr(fuzz, "HANG_S", 0.2)
    report = fuzz_target(Target("hangs", st.integers(0, 5), hang), 50, 0)
    assert len(report.failures) == 1 and "no answer within 0.2 s" in report.failures[0]


def test_the_api_and_export_targets_survive_a_few_inputs(fault_model, tmp_path):
    """run_fuzz end to end (the app in-process, the export CLI and console form): a few inputs
    a target, enough that every target's valid input and some mutations go through."""
    report = fuzz.run_fuzz(tmp_path, 12, 0, model_dir=fault_model,
                           targets=("chat_completions", "tenant_routes", "admin_routes",
                                    "export_cli", "export_console"))
    print(report.as_dict())
    assert report.ok, "\n\n".join(report.as_dict()["failures"])
    assert set(report.targets) == {"chat_completions", "tenant_routes", "admin_routes",
                                   "export_cli", "export_console"}
    assert all(t.inputs == 12 and t.accepted > 0 for t in report.targets.values())


def test_an_unknown_target_is_named(fault_model, tmp_path):
    with pytest.raises(ValueError, match="no fuzz target nope; the targets are adapter_upload"):
        fuzz.run_fuzz(tmp_path, 1, 0, model_dir=fault_model, targets=("nope",))
