"""LLMEngine: one base model, many adapters, one `step()` at a time."""

import os
from dataclasses import dataclass, field

import torch

from loraplex.config import ConfigError, EngineConfig
from loraplex.engine.adapter_manager import AdapterManager
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.sampler import sample
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import AdapterRequest, Sequence
from loraplex.model.loader import load_model
from loraplex.model.pull import resolve_model
from loraplex.model.tokenizer import Tokenizer
from loraplex.sampling_params import SamplingParams

MAX_DEFAULT_MODEL_LEN = 4096


class RequestError(ValueError):
    """A request the engine cannot take; the message says why."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    logprobs: list[float] = field(default_factory=list)  # of each generated token
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None


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
            self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras
        )
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.blocks, self.adapters)
        self.sequences: dict[str, Sequence] = {}
        self._arrivals = 0

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
    ) -> None:
        if request_id in self.sequences:
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
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this engine's context length "
                f"(max_model_len) is {self.max_model_len}, which leaves no room to generate"
            )
        seq = Sequence(request_id, prompt_ids, params, adapter, arrival=self._arrivals)
        self._arrivals += 1
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        if adapter is not None:
            self.adapters.poll(adapter)  # start reading it from disk right away

    def abort(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

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
        logits, outputs = self.runner.execute(batch)
        sampled = sample(logits, [item.seq for item in outputs])
        for item, token in zip(outputs, sampled, strict=True):
            seq = item.seq
            seq.output_token_ids.append(token.token_id)
            seq.output_logprobs.append({token.token_id: token.logprob, **token.top_logprobs})
            reason = self._finish_reason(seq, token.token_id)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            changed.append(seq)
        return [self._output(s) for s in changed]

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        if seq.is_finished:
            self.sequences.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            logprobs=[lp[t] for lp, t in zip(seq.output_logprobs, seq.output_token_ids,
                                              strict=True)],
            top_logprobs=list(seq.output_logprobs),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            error=seq.error,
        )

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_free": self.blocks.num_free,
            "preemptions": self.scheduler.num_preemptions,
            **self.adapters.snapshot(),
        }

    def shutdown(self) -> None:
        self.adapters.shutdown()
