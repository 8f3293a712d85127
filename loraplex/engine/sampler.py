"""Chooses each sequence's next token from its logits, with that request's own parameters.

Order (as in vLLM): logit_bias and the grammar's mask -> penalties -> temperature -> top-k /
top-p / min-p -> draw. Reported logprobs are always those of the model's raw distribution, before
any of these (OpenAI's logprobs ignore logit_bias too).

A draw uses one uniform number from the sequence's own generator when the request has a seed,
so its tokens do not depend on what else is in the batch.
"""

from dataclasses import dataclass

import torch

from loraplex.engine.guided import apply_bitmask
from loraplex.engine.sequence import Sequence


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None  # log-probability of the chosen token (None unless logprobs asked)
    top_logprobs: dict[int, float]  # the k most likely alternatives, when logprobs=k was asked


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [num_seqs, vocab], changed in place for the rows whose request asks for it."""
    vocab = logits.shape[1]
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        out = torch.tensor(seq.output_token_ids, dtype=torch.int64, device=logits.device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)  # [vocab]
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            seen[torch.tensor(seq.prompt_token_ids, device=logits.device)] = True
            seen |= counts > 0
            row_logits = logits[row]
            penalized = torch.where(row_logits > 0, row_logits / p.repetition_penalty,
                                    row_logits * p.repetition_penalty)
            logits[row] = torch.where(seen, penalized, row_logits)
        logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def apply_bias_and_grammars(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [num_seqs, vocab], changed in place: each row's logit_bias added, and the tokens
    its grammar does not allow next set to -inf (rows without either are untouched)."""
    for row, seq in enumerate(seqs):
        bias = seq.params.logit_bias
        if bias:
            ids = torch.tensor(list(bias), dtype=torch.int64, device=logits.device)
            values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
            logits[row].index_add_(0, ids, values)
    constrained = [row for row, seq in enumerate(seqs) if seq.grammar is not None]
    if constrained:
        words = (logits.shape[1] + 31) // 32
        bitmask = torch.full((len(constrained), words), -1, dtype=torch.int32)  # all allowed
        for i, row in enumerate(constrained):
            seqs[row].grammar.fill_mask(bitmask, i)
        rows = torch.tensor(constrained, device=logits.device)
        masked = logits[rows]
        apply_bitmask(masked, bitmask)
        logits[rows] = masked
    return logits


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p, per row. [rows, vocab] -> probabilities."""
    device = logits.device
    temps = torch.tensor([s.params.temperature for s in seqs], device=device)[:, None]
    probs = torch.softmax(logits / temps, dim=-1)
    if all(s.params.top_k <= 0 and s.params.top_p >= 1 for s in seqs):
        if any(s.params.min_p > 0 for s in seqs):
            min_p = torch.tensor([s.params.min_p for s in seqs], device=device)[:, None]
            probs = probs * (probs >= min_p * probs.max(dim=-1, keepdim=True).values)
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [rows, vocab]
    rank = torch.arange(probs.shape[1], device=device)[None, :]
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else probs.shape[1]
                          for s in seqs], device=device)[:, None]
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)[:, None]
    min_p = torch.tensor([s.params.min_p for s in seqs], device=device)[:, None]
    # A token stays if it is within the top k, the probability mass before it is below top_p
    # (so the most likely token always stays), and it is at least min_p x the most likely.
    keep = (rank < top_k) & (sorted_probs.cumsum(-1) - sorted_probs < top_p)
    keep &= sorted_probs >= min_p * sorted_probs[:, :1]
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)


def _draw(probs: torch.Tensor, seqs: list[Sequence], generator: torch.Generator) -> torch.Tensor:
    """Inverse-CDF sampling with one uniform per row. probs [rows, vocab] -> token ids [rows]."""
    uniforms = torch.empty(len(seqs), dtype=torch.float64)
    for row, seq in enumerate(seqs):
        uniforms[row] = torch.rand(1, generator=seq.generator or generator, dtype=torch.float64)
    cdf = probs.double().cumsum(dim=-1)  # [rows, vocab]
    targets = uniforms.to(probs.device)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, targets)[:, 0]
    return tokens.clamp_(max=probs.shape[1] - 1)


def sample(
    logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator
) -> list[SampledToken]:
    """logits [num_seqs, vocab] float32 -> one token per sequence. Logprobs (a full-vocabulary
    log-softmax) are only computed for the rows whose request asked for them."""
    logits_for_choice = logits
    if any(s.params.logit_bias or s.grammar is not None for s in seqs):
        logits_for_choice = apply_bias_and_grammars(logits.clone(), seqs)
    if any(s.params.has_penalties for s in seqs):
        logits_for_choice = apply_penalties(
            logits_for_choice if logits_for_choice is not logits else logits.clone(), seqs)
    chosen = logits_for_choice.argmax(dim=-1)  # [num_seqs], right for the greedy rows
    random_rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        random_seqs = [seqs[i] for i in random_rows]
        probs = _filtered_probs(logits_for_choice[rows], random_seqs)
        chosen[rows] = _draw(probs, random_seqs, generator)
    chosen_list = chosen.tolist()
    results = [SampledToken(token, None, {}) for token in chosen_list]
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        logprobs = torch.log_softmax(logits[rows], dim=-1)  # the model's own distribution
        chosen_logprobs = logprobs.gather(1, chosen[rows][:, None])[:, 0].tolist()
        max_k = max(seqs[i].params.logprobs for i in wanted)
        top_values, top_ids = logprobs.topk(max_k, dim=-1) if max_k else (None, None)
        for j, i in enumerate(wanted):
            k = seqs[i].params.logprobs
            top = {}
            if k:
                top = dict(zip(top_ids[j, :k].tolist(), top_values[j, :k].tolist(), strict=True))
            results[i] = SampledToken(chosen_list[i], chosen_logprobs[j], top)
    return results
