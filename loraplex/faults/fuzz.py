"""Fuzzing every parser of untrusted input: bad input gets a clear typed error, never an
unexpected exception, a hang or a 5xx; good input still works.

The parsers (one target each, in fuzz_*.py): a tenant's adapter upload (safetensors header and
tensors, adapter_config.json: fuzz_adapters.py), a dataset's JSONL and its training examples
(fuzz_datasets.py), the HTTP API's request bodies (fuzz_requests.py, the app in-process) and
the GGUF export's arguments (fuzz_exports.py). Each target draws `examples` inputs with
hypothesis from valid ones, mutated or not, and sorts each answer into accepted (the input
worked), refused (a typed error: the parser's own error type, or a 4xx in OpenAI's error shape)
or a failure (anything else; a valid input refused is one too). A failure is shrunk by
hypothesis and reported with its input.

    report = run_fuzz(root, examples=1000, seed=0)   # or `python -m loraplex.faults fuzz`
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

ACCEPTED, REFUSED = "accepted", "refused"
# One input may take this long (a tiny model answers a request in well under a second); past it
# the parser counts as hung.
HANG_S = 30.0
MAX_REPORTED_FAILURES = 5  # per target: the shrunk one first


class Fault(AssertionError):
    """An answer that breaks the property: the message says which and how."""


class Hang(Fault):
    pass


@dataclass(frozen=True)
class Target:
    """One parser: `inputs` draws an input, `check(input)` feeds it and returns ACCEPTED or
    REFUSED, or raises (Fault, or whatever the parser let escape)."""

    name: str
    inputs: st.SearchStrategy
    check: Callable[[object], str]


@dataclass
class TargetReport:
    inputs: int = 0
    accepted: int = 0
    refused: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Report:
    examples: int
    seed: int
    targets: dict[str, TargetReport] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(t.failures for t in self.targets.values())

    def as_dict(self) -> dict:
        return {
            "ok": self.ok, "examples": self.examples, "seed": self.seed,
            "inputs": {name: t.inputs for name, t in self.targets.items()},
            "targets": {name: vars(t) | {"seconds": round(t.seconds, 1)}
                        for name, t in self.targets.items()},
            "failures": [f"{name}: {failure}" for name, t in self.targets.items()
                         for failure in t.failures],
            "seconds": round(self.seconds, 1),
        }


def refused(expect: str, error: Exception, what: str) -> str:
    """REFUSED for a typed error with a message, where the input did not have to work."""
    if expect == "ok":
        raise Fault(f"a valid {what} was refused: {error}")
    if not str(error).strip():
        raise Fault(f"a {what} refused without a message")
    return REFUSED


def run_fuzz(root: Path, examples: int, seed: int, *, targets: tuple[str, ...] | None = None,
             model_dir: Path | None = None) -> Report:
    """Fuzz every target (or those named: a ValueError names the unknown ones) with `examples`
    inputs each; `root` holds the home the server targets use, and the tiny model unless
    `model_dir` is one already built."""
    from loraplex.faults.fuzz_adapters import adapter_targets
    from loraplex.faults.fuzz_datasets import dataset_targets
    from loraplex.faults.fuzz_exports import export_targets
    from loraplex.faults.fuzz_requests import fuzz_app, request_targets
    from loraplex.faults.tiny_model import write_tiny_model

    started = time.perf_counter()
    report = Report(examples, seed)
    model_dir = model_dir or write_tiny_model(Path(root) / "model")
    with fuzz_app(Path(root) / "api", model_dir) as app:
        every = [*adapter_targets(model_dir), *dataset_targets(model_dir),
                 *request_targets(app), *export_targets(app)]
        unknown = set(targets or ()) - {t.name for t in every}
        if unknown:
            raise ValueError(f"no fuzz target {', '.join(sorted(unknown))}; the targets are "
                             f"{', '.join(t.name for t in every)}")
        for target in every:
            if targets is None or target.name in targets:
                report.targets[target.name] = fuzz_target(target, examples, seed)
    report.seconds = time.perf_counter() - started
    return report


def fuzz_target(target: Target, examples: int, seed: int) -> TargetReport:
    """Draw `examples` inputs of `target` and check each; the failures, shrunk, in the report."""
    result = TargetReport()
    started = time.perf_counter()

    @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              phases=(Phase.explicit, Phase.generate, Phase.shrink))
    @hypothesis_seed(seed)
    @given(st.data())
    def fuzz(data):
        value = data.draw(target.inputs, label="input")
        result.inputs += 1
        with _time_limit(HANG_S):
            outcome = target.check(value)
        if outcome not in (ACCEPTED, REFUSED):
            raise Fault(f"check returned {outcome!r}")
        setattr(result, outcome, getattr(result, outcome) + 1)

    try:
        fuzz()
    except Exception as error:  # the shrunk failure: hypothesis re-raises it after shrinking
        result.failures.append(_describe(error))
    result.seconds = time.perf_counter() - started
    return result


def _describe(error: BaseException) -> str:
    """The failure and where it came from; the input is in hypothesis' note on it."""
    notes = [n for n in getattr(error, "__notes__", []) if n.startswith("Draw")]
    where = "".join(traceback.format_tb(error.__traceback__)[-2:]).strip()
    kind = "" if isinstance(error, Fault) else f"{type(error).__name__}: "
    return f"{kind}{error}\n  input: {' '.join(notes)[:2000]}\n  at: {where[-1500:]}"


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """A Hang if the block runs past `seconds`. Only the main thread gets signals; elsewhere
    the block just runs (pure-Python work and the regex engine are interruptible)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hung(_signum, _frame):
        raise Hang(f"no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
