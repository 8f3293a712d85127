"""What every benchmarked system implements, and what it records per request.

A system is set up once with the run's base model and adapters (PEFT directories), then runs a
whole workload and returns one RequestRecord per request; timings are time.perf_counter()
seconds relative to the run's start. Systems that must batch statically (transformers + PEFT)
or serially (llama.cpp) still honour arrival times: a request is not started before it arrives.

The workload's concurrency reaches a system as its constructor's `max_batch_size` (run.py builds
every system as `Cls(max_batch_size=spec.concurrency)`), and one dispatch rule serves both kinds
of workload: a request starts once its arrival time has passed and fewer than max_batch_size
requests are in flight. With every arrival at 0 (closed loop) that is max_batch_size clients
each sending its next request when the last one finished; with poisson / gamma arrivals (open
loop) each request starts when it arrives, up to max_batch_size at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from loraplex.bench.workload import BenchRequest


@dataclass
class RequestRecord:
    index: int
    adapter: int | None
    prompt_tokens: int
    arrival_s: float  # when it was due (from the workload)
    start_s: float  # when the system began working on it
    token_times_s: list[float] = field(default_factory=list)  # one per generated token
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ttft_s(self) -> float | None:
        """Time to first token, from arrival (queueing included, as a client sees it)."""
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies."""
        times = self.token_times_s
        return [b - a for a, b in zip(times, times[1:], strict=False)]


class System(Protocol):
    name: str  # as shown in tables, e.g. "loraplex engine", "PEFT mixed batch"

    def setup(self, model_dir: Path, adapters: list[Path], *, dtype: str) -> None:
        """Load the base model and make every adapter usable (not timed)."""

    def run(self, requests: list[BenchRequest]) -> list[RequestRecord]:
        """Serve every request (greedy, exactly max_tokens tokens each); one record each."""

    def stats(self) -> dict:
        """System-specific counters after a run (adapter slot hits/misses, loads...)."""

    def close(self) -> None:
        """Free the model and any processes or threads."""
