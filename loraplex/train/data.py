"""Training examples: dataset records -> token ids and labels, in the base model's chat format.

Each assistant turn is tokenized exactly as serving will see it: the conversation up to that
turn rendered with the model's own chat template and the generation prompt (what the engine
encodes for a request), then the assistant's text as the template writes it, up to and
including its end-of-turn token. The loss covers those assistant tokens only; system and user
turns are context, never targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.model.tokenizer import Tokenizer
from loraplex.vault.records import ASSISTANT, as_messages

IGNORE = -100  # the label of a token that is context, not a target (cross_entropy's default)


class TrainingError(ValueError):
    """Training cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE, or the token itself where the assistant speaks


def build_examples(tokenizer: Tokenizer, records: list[dict], max_length: int) -> list[Example]:
    """One example per record, cut to max_length tokens."""
    if not tokenizer.chat_template:
        raise TrainingError("the base model has no chat template to format the dataset with")
    examples = []
    for index, record in enumerate(records):
        try:
            example = build_example(tokenizer, as_messages(record))
        except TrainingError as e:
            raise TrainingError(f"record {index + 1}: {e}") from None
        examples.append(Example(example.input_ids[:max_length], example.labels[:max_length]))
    return examples


def build_example(tokenizer: Tokenizer, messages: list[dict]) -> Example:
    input_ids, labels = [], []
    rendered = ""  # the text tokenized so far
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        answer = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        # Templates that rewrite earlier turns (e.g. add a default system prompt only once
        # there is a user message) cannot be cut into context and answer this way.
        if not (prompt.startswith(rendered) and answer.startswith(prompt)):
            raise TrainingError(
                f"the chat template does not render message {i + 1} after the ones before it; "
                "start conversations with a system or user message")
        context = tokenizer.encode(prompt[len(rendered):], add_special_tokens=False)
        target = tokenizer.encode(answer[len(prompt):], add_special_tokens=False)
        input_ids += context + target
        labels += [IGNORE] * len(context) + target
        rendered = answer
    return Example(input_ids, labels)


def split(num_examples: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded shuffle, so a seed always holds out the
    same examples. At least one example is held out when eval_fraction > 0, and at least
    one is left to train on."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    num_eval = 0 if eval_fraction == 0 else max(1, round(num_examples * eval_fraction))
    if num_examples - num_eval < 1:
        raise TrainingError(
            f"{num_examples} example(s) leave nothing to train on after holding out "
            f"{num_eval} for evaluation; add records or lower eval_fraction")
    return order[num_eval:], order[:num_eval]


def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded batch tensors, [batch, longest]; padding is masked out and never a target."""
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.zeros(len(examples), longest, dtype=torch.long)  # pad id: any, masked
    attention_mask = torch.zeros(len(examples), longest, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
