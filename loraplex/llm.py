"""LLM: the offline API, shaped like vLLM's (`LLM(...).generate(prompts, params)`)."""

from dataclasses import dataclass
from pathlib import Path

from loraplex.config import EngineConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.sequence import AdapterRequest
from loraplex.sampling_params import SamplingParams


@dataclass(frozen=True)
class CompletionOutput:
    index: int  # which of the prompt's n completions
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens
    text: str
    logprobs: list[float]  # log-probability of each generated token (when logprobs was set)
    top_logprobs: list[dict[int, float]]  # per token: the top-k alternatives, if asked
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None  # why this prompt failed (e.g. its adapter is broken)


class LLM:
    def __init__(self, model: str = "smollm2-135m", **config):
        """`config` takes any EngineConfig field (max_loras, max_lora_rank, dtype, device...)."""
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer
        self._adapter_ids: dict[Path, int] = {}
        self._next_request = 0

    def _adapter(self, path: str | Path | None) -> AdapterRequest | None:
        if path is None:
            return None
        path = Path(path).resolve()
        adapter_id = self._adapter_ids.setdefault(path, len(self._adapter_ids))
        return AdapterRequest(adapter_id, str(path))

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        adapters: list[str | Path | None] | None = None,
    ) -> list[CompletionOutput]:
        """Generate for every prompt, batched; adapters[i] (a PEFT dir or None) applies to
        prompts[i], and so does sampling_params[i] when a list is given (one for all
        otherwise). Returns the completions in prompt order (n consecutive ones per prompt
        when n > 1). A prompt whose adapter is broken gets outputs with `.error` set; the
        others are unaffected."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        )
        if single:
            prompts = [prompts]
        adapters = adapters if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapters given for {len(prompts)} prompts")
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"{len(sampling_params)} sampling params given for "
                                 f"{len(prompts)} prompts")
            per_prompt = sampling_params
        else:
            per_prompt = [sampling_params or SamplingParams()] * len(prompts)
        ids = []
        for prompt, params, adapter in zip(prompts, per_prompt, adapters, strict=True):
            request_id = f"offline-{self._next_request}"
            self._next_request += 1
            self.engine.add_request(request_id, prompt, params, self._adapter(adapter))
            ids.append((request_id, params.n))
        final = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    final[(out.request_id, out.index)] = out
        return [
            CompletionOutput(
                index=out.index,
                prompt_token_ids=out.prompt_token_ids,
                token_ids=out.token_ids,
                text=out.text,
                logprobs=out.logprobs,
                top_logprobs=out.top_logprobs,
                finish_reason=out.finish_reason,
                error=out.error,
            )
            for out in (final[(i, k)] for i, n in ids for k in range(n))
        ]
