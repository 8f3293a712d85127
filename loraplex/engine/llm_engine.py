"""LLMEngine: one base model, many adapters, one `step()` at a time."""

import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from loraplex.config import ConfigError, EngineConfig
from loraplex.engine.adapter_manager import AdapterManager
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.guided import GrammarCompiler, GrammarError
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.sampler import sample
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import AdapterRequest, Sequence
from loraplex.lora.packed import adapter_cache_dir
from loraplex.model.loader import load_model
from loraplex.model.pull import resolve_model
from loraplex.model.tokenizer import Tokenizer
from loraplex.sampling_params import SamplingParams

MAX_DEFAULT_MODEL_LEN = 4096
TOKENS_PER_SECOND_WINDOW = 10.0  # seconds of history behind stats()["tokens_per_second"]


class RequestError(ValueError):
    """A request the engine cannot take; the message says why."""


@dataclass
class RequestOutput:
    """The state of one completion (`index` of the request's n) after a step."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    text: str  # generated text so far, safe to show (never part of a stop string)
    logprobs: list[float] = field(default_factory=list)  # of each token, if logprobs was asked
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # top-k alternatives
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    # Whose fault an error is: "request" (its own input, e.g. a broken adapter: a client error)
    # or "engine" (the model or the engine failed: a server error).
    error_kind: str | None = None
    queue_seconds: float | None = None  # from arrival to first admission; None while queued


def _total_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        model_dir = resolve_model(config.model)
        self.model = load_model(model_dir, config.torch_dtype, config.torch_device)
        self.tokenizer = Tokenizer(model_dir)
        self.grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size)
        self.max_model_len = self._max_model_len()
        kv_bytes = config.kv_cache_bytes or int(
            config.kv_cache_fraction * _total_memory(config.torch_device)
        )
        num_blocks = kv_bytes // ModelRunner.kv_bytes_per_block(self.model, config)
        if num_blocks * config.block_size < self.max_model_len:
            raise ConfigError(
                f"kv_cache_bytes={kv_bytes} holds {num_blocks * config.block_size} tokens, fewer "
                f"than one sequence of max_model_len={self.max_model_len}; raise kv_cache_bytes "
                "or lower max_model_len"
            )
        self.runner = ModelRunner(self.model, config, num_blocks)
        self.adapters = AdapterManager(
            self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras,
            cache_dir=adapter_cache_dir() if config.adapter_cache else None,
            int8=config.lora_dtype == "int8", num_pages=config.num_lora_pages,
            page_rank=config.lora_page_rank,
        )
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks, self.adapters)
        self.requests: dict[str, list[Sequence]] = {}  # unfinished requests by id
        self._arrivals = 0
        self.generator = torch.Generator()  # for requests without a seed
        self.generator.seed()
        self.num_generated_tokens = 0
        self._recent_tokens: deque[tuple[float, int]] = deque()  # (time, tokens) per step

    def _max_model_len(self) -> int:
        mc = self.model.config
        limit = mc.max_position_embeddings
        if mc.sliding_window:
            limit = min(limit, mc.sliding_window)
        wanted = self.config.max_model_len
        if wanted is None:
            return min(limit, MAX_DEFAULT_MODEL_LEN)
        if wanted > limit:
            raise ConfigError(f"max_model_len={wanted} exceeds what the model supports ({limit})")
        return wanted

    # -- requests -------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: AdapterRequest | None = None,
        fairness_key: str = "",
        fairness_weight: float = 1.0,
    ) -> None:
        """Queue a request. `fairness_key` is the tenant, opaque to the engine: keys share the
        engine in proportion to their `fairness_weight` (the latest weight given for a key
        holds), and never find each other's blocks in the prefix cache."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
            vocab = self.model.config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
                raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if isinstance(fairness_weight, bool) or not isinstance(fairness_weight, int | float) \
                or not 0 < fairness_weight < float("inf"):
            raise RequestError(f"fairness_weight must be a positive number, got "
                               f"{fairness_weight!r}")
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise RequestError(f"logit_bias keys must be token ids in [0, {vocab})")
        grammar = None
        if params.grammar is not None:
            try:
                grammar = self.grammars.compile(params.grammar)  # cached: the server compiled it
            except GrammarError as e:
                raise RequestError(str(e)) from None
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this engine's context length "
                f"(max_model_len) is {self.max_model_len}, which leaves no room to generate"
            )
        seqs = []
        added_at = time.monotonic()
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator().manual_seed(params.seed + index)
            seqs.append(Sequence(request_id, index, prompt_ids, params, adapter,
                                 arrival=self._arrivals, generator=generator,
                                 fairness_key=fairness_key, cache_key=fairness_key,
                                 added_at=added_at,
                                 grammar=grammar.matcher() if grammar else None))
            self._arrivals += 1
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq, fairness_weight)
        if adapter is not None:
            self.adapters.poll(adapter)  # start reading it from disk right away

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now; its KV blocks and adapter slot hold are freed at once."""
        seqs = self.requests.get(request_id, [])
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return [self._output(seq) for seq in seqs]

    def prewarm(self, adapter: AdapterRequest, pin: bool = False) -> None:
        """Load an adapter ahead of traffic: into the host cache now, and into a slot if one is
        free. `pin` keeps it resident (host cache and slot) until `unpin`."""
        self.adapters.load_now(adapter)
        if pin:
            self.adapters.pin(adapter.adapter_id)
        in_use = {s.adapter_id for s in self.scheduler.running if s.adapter is not None}
        self.adapters.acquire_slot(adapter.adapter_id, in_use, self.scheduler.step_count,
                                   may_reserve=False)

    def unpin(self, adapter_id: int) -> None:
        self.adapters.unpin(adapter_id)

    def evict_adapters(self, adapter_ids: set[int]) -> list[RequestOutput]:
        """Their owner's data was deleted (crypto-shredding): finish their requests with an
        error now, then drop them from the host cache and zero their slots, so no copy of the
        weights stays resident until a slot happens to be reused."""
        outputs = []
        for seqs in list(self.requests.values()):
            if not any(s.adapter_id in adapter_ids and not s.is_finished for s in seqs):
                continue
            for seq in seqs:
                if not seq.is_finished:
                    seq.error, seq.error_kind = "the adapter was deleted", "request"
                    self.scheduler.finish(seq, "error")
            outputs += [self._output(seq) for seq in seqs]
        self.adapters.forget(adapter_ids)
        self.adapters.evict_slots(adapter_ids)
        return outputs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Finish every unfinished request with an error (after the model itself failed)."""
        outputs = []
        for seqs in list(self.requests.values()):
            for seq in seqs:
                if not seq.is_finished:
                    seq.error, seq.error_kind = message, "engine"
                    self.scheduler.finish(seq, "error")
            outputs += [self._output(seq) for seq in seqs]
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_waiting(self) -> bool:
        """Whether requests wait for a seat or a prompt chunk (the next step has work to take)."""
        return bool(self.scheduler.waiting)

    # -- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; returns the requests that changed."""
        batch, failed = self.scheduler.schedule()
        changed = []
        for seq in failed:
            self.scheduler.finish(seq, "error")
            changed.append(seq)
        if not batch:
            if self.scheduler.has_unfinished():
                self.adapters.wait_for_loads(timeout=0.05)  # nothing runnable until a load lands
            return [self._output(s) for s in changed]
        logits, outputs = self.runner.execute(batch, self.adapters.slots.places)
        if not outputs:  # every sequence was mid-prefill: nothing to sample yet
            return [self._output(s) for s in changed]
        sampled = sample(logits, [item.seq for item in outputs], self.generator)
        self.num_generated_tokens += len(sampled)
        now = time.monotonic()
        self._recent_tokens.append((now, len(sampled)))
        while now - self._recent_tokens[0][0] > TOKENS_PER_SECOND_WINDOW:
            self._recent_tokens.popleft()
        for item, token in zip(outputs, sampled, strict=True):
            seq = item.seq
            seq.output_token_ids.append(token.token_id)
            if token.logprob is not None:
                seq.output_logprobs.append(token.logprob)
                seq.output_top_logprobs.append(token.top_logprobs)
            if seq.grammar is not None:
                seq.grammar.consume(token.token_id)
                if seq.grammar.error:  # cannot happen with its mask applied; never run on
                    seq.error, seq.error_kind = f"grammar: {seq.grammar.error}", "engine"
                    self.scheduler.finish(seq, "error")
                    changed.append(seq)
                    continue
            reason = self._update_text(seq) or self._finish_reason(seq, token.token_id)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            changed.append(seq)
        return [self._output(s) for s in changed]

    def _update_text(self, seq: Sequence) -> str | None:
        """Detokenize the output so far; cut it at a stop string and return "stop" if one shows."""
        text = self.tokenizer.decode(seq.output_token_ids)
        if text.endswith("\ufffd"):
            return None  # a multi-byte character is only half there yet
        stops = seq.params.stop
        if stops:
            # Only the new text (plus a stop string's length of overlap) can hold a new match.
            start = max(0, len(seq.output_text) - max(len(x) for x in stops))
            hits = [i for i in (text.find(x, start) for x in stops) if i >= 0]
            if hits:
                seq.output_text = text[: min(hits)]
                return "stop"
        seq.output_text = text
        return None

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        if token_id in params.stop_token_ids:
            return "stop"
        if seq.grammar is not None and seq.grammar.is_done:
            return "stop"  # the structured output is complete
        if not params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        seqs = self.requests.get(seq.request_id, [])
        if seqs and all(s.is_finished for s in seqs):
            del self.requests[seq.request_id]
        text = seq.output_text
        if not seq.is_finished and seq.params.stop:
            # Hold back what could still become the start of a stop string.
            text = text[: max(0, len(text) - max(len(x) for x in seq.params.stop) + 1)]
        return RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=text,
            logprobs=list(seq.output_logprobs),
            top_logprobs=list(seq.output_top_logprobs),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            error=seq.error,
            error_kind=seq.error_kind,
            queue_seconds=seq.queue_seconds,
        )

    def stats(self) -> dict:
        """A snapshot of the engine's state and counters (cheap; safe to call any time)."""
        loads = sorted(self.adapters.stats.load_seconds)
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_free": self.blocks.num_free,
            **self.scheduler.prefix_cache.stats(),
            "preemptions": self.scheduler.num_preemptions,
            "fairness_preemptions": self.scheduler.num_fairness_preemptions,
            "fairness": self.scheduler.fairness(),
            "steps": self.scheduler.step_count,
            "generated_tokens": self.num_generated_tokens,
            "tokens_per_second": self._tokens_per_second(),
            "adapter_load_ms_p50": 1e3 * loads[len(loads) // 2] if loads else None,
            "adapter_load_ms_max": 1e3 * loads[-1] if loads else None,
            **self.adapters.snapshot(),
        }

    def _tokens_per_second(self) -> float:
        if len(self._recent_tokens) < 2:
            return 0.0
        span = self._recent_tokens[-1][0] - self._recent_tokens[0][0]
        return sum(n for _, n in list(self._recent_tokens)[1:]) / span if span > 0 else 0.0

    def shutdown(self) -> None:
        self.adapters.shutdown()
