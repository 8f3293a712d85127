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
