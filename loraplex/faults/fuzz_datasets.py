"""Fuzz target: a tenant's dataset upload (vault/records.py's JSONL check) and what training
makes of the records it accepts (train/data.py's examples, in the tiny model's chat format).

Inputs start as valid JSONL (chat and prompt/completion records, blank lines, CRLF) and get
mutations: a record's field removed, added or set to any JSON value, a message's role or
content changed, a line replaced by random text, bytes that are not UTF-8, JSON nested
thousands deep. Property: InvalidDataset, or exactly the records written; an accepted record
becomes a training example or a TrainingError; an unmutated file is accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hypothesis import strategies as st

from loraplex.faults.fuzz import ACCEPTED, REFUSED, Fault, Target, refused
from loraplex.faults.fuzz_adapters import JSON
from loraplex.model.tokenizer import Tokenizer
from loraplex.train.data import TrainingError, build_examples
from loraplex.vault import InvalidDataset, parse_jsonl

MAX_LENGTH = 256  # tokens per training example
TEXT = st.text(min_size=1, max_size=40).filter(str.strip)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(("system", "user")), "content": TEXT})
ANSWER = st.fixed_dictionaries({"role": st.just("assistant"), "content": TEXT})
CHAT = st.builds(lambda before, answer, after: {"messages": [*before, answer, *after]},
                 st.lists(MESSAGE, max_size=3), ANSWER,
                 st.lists(MESSAGE | ANSWER, max_size=2))
COMPLETION = st.fixed_dictionaries({"prompt": TEXT, "completion": TEXT})
HOSTILE_LINES = (b"[" * 20_000, b'{"messages":' + b"[" * 20_000, b'{"prompt": NaN}', b"\xff\xfe",
                 b'{"prompt": "\\ud800", "completion": "x"}', b"\x00", b"1" * 5_000, b"\x1c",
                 b'{"messages": [{"role": "assistant", "content": "a"}]}' * 2)


@dataclass
class DatasetDraft:
    records: list  # what each line holds (a record, or raw bytes for a mutated line)
    newline: bytes = b"\n"
    blank_after: int | None = None  # a blank line after this record
    expect: str = "ok"
    mutations: list[str] = field(default_factory=list)

    def data(self) -> bytes:
        lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in self.records]
        if self.blank_after is not None:
            lines.insert(self.blank_after + 1, b"  ")
        return self.newline.join(lines) + self.newline


@st.composite
def datasets(draw) -> DatasetDraft:
    draft = DatasetDraft(draw(st.lists(CHAT | COMPLETION, min_size=1, max_size=4)),
                         draw(st.sampled_from((b"\n", b"\r\n"))))
    if draw(st.booleans()):
        draft.blank_after = draw(st.integers(0, len(draft.records) - 1))
    for _ in range(draw(st.integers(0, 3))):
        _mutate(draw, draft)
    return draft


def _mutate(draw, draft: DatasetDraft) -> None:
    index = draw(st.integers(0, len(draft.records) - 1))
    record = draft.records[index]
    kind = draw(st.sampled_from(("field", "message", "line", "hostile")))
    if kind == "field" and isinstance(record, dict):
        record = dict(record)
        key = draw(st.sampled_from(("messages", "prompt", "completion", "text")) | st.text(
            max_size=6))
        if draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = draw(JSON)
        draft.mutations.append(f"record {index}: {key!r}")
    elif kind == "message" and isinstance(record, dict) and isinstance(
            record.get("messages"), list) and record["messages"]:
        messages = [dict(m) if isinstance(m, dict) else m for m in record["messages"]]
        i = draw(st.integers(0, len(messages) - 1))
        if isinstance(messages[i], dict):
            key = draw(st.sampled_from(("role", "content", "name")))
            messages[i][key] = draw(JSON | st.sampled_from(("assistant", "tool", " ")))
        else:
            messages[i] = draw(JSON)
        record = {**record, "messages": messages}
        draft.mutations.append(f"record {index}: messages[{i}]")
    elif kind == "line":
        record = draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
        draft.mutations.append(f"line {index}: {record[:40]!r}")
    else:
        record = draw(st.sampled_from(HOSTILE_LINES))
        draft.mutations.append(f"line {index}: {record[:40]!r}")
    draft.records[index] = record
    draft.expect = "either"


def dataset_targets(model_dir) -> list[Target]:
    tokenizer = Tokenizer(model_dir)

    def check(draft: DatasetDraft) -> str:
        try:
            records = parse_jsonl(draft.data())
        except InvalidDataset as e:
            return refused(draft.expect, e, "dataset")
        if draft.expect == "ok" and records != draft.records:
            raise Fault(f"read back {records!r}, written {draft.records!r}")
        try:
            examples = build_examples(tokenizer, records, MAX_LENGTH)
        except TrainingError:
            return REFUSED  # e.g. a conversation the chat template cannot cut into turns
        if any(len(e.input_ids) != len(e.labels) for e in examples):
            raise Fault("an example's labels do not line up with its tokens")
        return ACCEPTED

    return [Target("dataset_jsonl", datasets(), check)]
