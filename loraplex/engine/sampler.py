"""Chooses each sequence's next token from its logits."""

from dataclasses import dataclass

import torch

from loraplex.engine.sequence import Sequence


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float  # log-probability of the chosen token under the model
    top_logprobs: dict[int, float]  # the k most likely alternatives, when logprobs=k was asked


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
    """logits [num_seqs, vocab] float32 -> one token per sequence (greedy)."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [num_seqs, vocab]
    chosen = logits.argmax(dim=-1)  # [num_seqs]
    chosen_logprobs = logprobs.gather(1, chosen[:, None])[:, 0]
    max_k = max((s.params.logprobs or 0) for s in seqs)
    top_values, top_ids = logprobs.topk(max_k, dim=-1) if max_k else (None, None)
    results = []
    for i, seq in enumerate(seqs):
        k = seq.params.logprobs or 0
        top = {}
        if k:
            top = dict(zip(top_ids[i, :k].tolist(), top_values[i, :k].tolist(), strict=True))
        results.append(SampledToken(int(chosen[i]), float(chosen_logprobs[i]), top))
    return results
