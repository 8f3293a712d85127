"""Per-request state as it moves through the engine."""

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from loraplex.engine.guided import GrammarMatcher
from loraplex.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not yet admitted (or preempted: its KV cache was freed)
    RUNNING = "running"  # holds KV blocks and an adapter slot
    FINISHED = "finished"


@dataclass(frozen=True)
class AdapterRequest:
    """The adapter a request uses, as the caller (registry / CLI) resolved it."""

    adapter_id: int  # a stable integer per adapter version; the engine's cache key
    path: str  # the PEFT directory on disk; with read_files, only the adapter's name
    # The adapter's files ({file name: bytes}) when they are not plain on disk (a registry
    # artifact is encrypted: this decrypts it in memory), called on a host cache miss only.
    read_files: Callable[[], Mapping[str, bytes]] | None = field(default=None, compare=False)
    cache_scope: str = ""  # the adapter cache's sub-directory for it (its owner, opaque)


@dataclass(eq=False)
class Sequence:
    """One completion being generated; a request with n > 1 has n of them."""

    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: AdapterRequest | None
    arrival: int  # arrival order: within a tenant, admission and preemption choose by it
    generator: torch.Generator | None = None  # set when the request has a seed
    fairness_key: str = ""  # the tenant, opaque: fair shares are kept per key
    # The tenant, opaque, as given (scheduling="fcfs" blanks fairness_key, never this): prefix
    # cache blocks are never shared between keys, and hits are counted per key.
    cache_key: str = ""
    added_at: float = 0.0  # time.monotonic() when the request arrived
    grammar: GrammarMatcher | None = None  # where the output stands in its grammar, if any
    queue_seconds: float | None = None  # from arrival to first admission; None while queued
    output_text: str = ""  # detokenized output, cut at a stop string
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)  # of each generated token
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)  # top-k each
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose keys/values are in the KV cache
    # Prompt tokens settled with the key: charged once (not again when recomputed after a
    # preemption), or found in the prefix cache (not computed: not charged).
    num_charged_prompt_tokens: int = 0
    num_fairness_preemptions: int = 0  # preempted to free a seat for a tenant below its share
    block_table: list[int] = field(default_factory=list)
    # The prefix cache's hash of each full block of token_ids so far (engine/prefix_cache.py);
    # kept through a preemption (the tokens do not change).
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks of block_table offered to the prefix cache
    slot: int = -1  # adapter slot while running; -1 for the base model
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    error_kind: str | None = None  # "request": its own input (e.g. a broken adapter); "engine"

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def adapter_id(self) -> int | None:
        return None if self.adapter is None else self.adapter.adapter_id

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
