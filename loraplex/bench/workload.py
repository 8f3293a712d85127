"""Benchmark workloads in the manner of S-LoRA and Punica: which adapter each request uses, when
it arrives, how long its prompt and its answer are. Pure Python and seeded: every system of one
benchmark run gets exactly the same list of requests.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

POPULARITIES = ("distinct", "uniform", "zipf", "identical")
ARRIVALS = ("closed", "poisson", "gamma")


class WorkloadError(ValueError):
    pass


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 32
    num_adapters: int = 32  # 0: every request runs on the base model
    # distinct: request i uses adapter i % num_adapters; uniform: each draws one at random;
    # zipf: adapter k (1-based rank) drawn with probability ~ 1 / k**zipf_alpha; identical: all
    # use adapter 0.
    popularity: str = "distinct"
    zipf_alpha: float = 1.0
    # closed: `concurrency` clients each send their next request when the last one finished;
    # poisson / gamma: requests arrive on their own at `rate` per second (gamma with a
    # coefficient of variation `cv`; cv = 1 is poisson, larger is burstier).
    arrival: str = "closed"
    concurrency: int = 32
    rate: float = 4.0
    cv: float = 1.0
    prompt_len: tuple[int, int] = (16, 256)  # uniform, inclusive
    output_len: tuple[int, int] = (16, 128)  # uniform, inclusive; generated exactly (ignore EOS)
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.num_requests >= 1, f"num_requests must be at least 1, got {self.num_requests}"),
            (self.num_adapters >= 0, f"num_adapters must be >= 0, got {self.num_adapters}"),
            (self.popularity in POPULARITIES,
             f"popularity must be one of {', '.join(POPULARITIES)}, got {self.popularity!r}"),
            (self.zipf_alpha > 0, f"zipf_alpha must be positive, got {self.zipf_alpha}"),
            (self.arrival in ARRIVALS,
             f"arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}"),
            (self.concurrency >= 1, f"concurrency must be at least 1, got {self.concurrency}"),
            (self.rate > 0, f"rate must be positive, got {self.rate}"),
            (self.cv > 0, f"cv must be positive, got {self.cv}"),
            (1 <= self.prompt_len[0] <= self.prompt_len[1],
             f"prompt_len must be 1 <= low <= high, got {self.prompt_len}"),
            (1 <= self.output_len[0] <= self.output_len[1],
             f"output_len must be 1 <= low <= high, got {self.output_len}"),
        ]
        for ok, message in checks:
            if not ok:
                raise WorkloadError(message)


@dataclass(frozen=True)
class BenchRequest:
    index: int
    arrival_s: float  # seconds after the start (0 for every request of a closed loop)
    adapter: int | None  # index into the run's adapter list; None: the base model
    prompt_ids: tuple[int, ...]
    max_tokens: int  # generated exactly: systems must ignore EOS


def make_workload(spec: WorkloadSpec, vocab_ids: range | list[int]) -> list[BenchRequest]:
    """The requests of `spec`; prompt tokens are drawn from `vocab_ids` (ordinary tokens only,
    so no system stops early or special-cases them)."""
    rng = random.Random(spec.seed)
    vocab = list(vocab_ids)
    if not vocab:
        raise WorkloadError("vocab_ids is empty")
    weights = None
    if spec.popularity == "zipf" and spec.num_adapters:
        weights = [1 / (k ** spec.zipf_alpha) for k in range(1, spec.num_adapters + 1)]
    requests, clock = [], 0.0
    for i in range(spec.num_requests):
        if spec.num_adapters == 0:
            adapter = None
        elif spec.popularity == "distinct":
            adapter = i % spec.num_adapters
        elif spec.popularity == "identical":
            adapter = 0
        elif spec.popularity == "uniform":
            adapter = rng.randrange(spec.num_adapters)
        else:
            adapter = rng.choices(range(spec.num_adapters), weights)[0]
        if spec.arrival != "closed":
            clock += _gap(rng, spec)
        prompt_len = rng.randint(*spec.prompt_len)
        requests.append(BenchRequest(
            index=i, arrival_s=clock if spec.arrival != "closed" else 0.0, adapter=adapter,
            prompt_ids=tuple(rng.choice(vocab) for _ in range(prompt_len)),
            max_tokens=rng.randint(*spec.output_len)))
    return requests


def _gap(rng: random.Random, spec: WorkloadSpec) -> float:
    """Time to the next arrival: exponential (poisson) or gamma with mean 1/rate and the cv."""
    if spec.arrival == "poisson":
        return rng.expovariate(spec.rate)
    shape = 1 / spec.cv**2  # gamma: cv = 1 / sqrt(shape); mean = shape * scale
    return rng.gammavariate(shape, 1 / (spec.rate * shape))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
