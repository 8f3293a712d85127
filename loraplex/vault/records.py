"""Dataset files: JSONL, one training example per line, checked line by line on upload.

Two shapes of record are accepted:
- chat: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} with at
  least one assistant message (the assistant's turns are what training learns);
- completion: {"prompt": str, "completion": str} (trained as one user turn and its answer).
Nothing else is accepted, not even extra fields: a field we would silently ignore is more
likely a mistake in the file than something the tenant meant to be ignored.
"""

from __future__ import annotations

import json

from loraplex.vault.errors import InvalidDataset

ROLES = ("system", "user", "assistant")
ASSISTANT = "assistant"
CHAT_FIELDS = {"messages"}
COMPLETION_FIELDS = {"prompt", "completion"}
MESSAGE_FIELDS = {"role", "content"}
# Enough to fix a file in one go, without flooding the terminal when every line is wrong.
MAX_REPORTED_ERRORS = 10


def parse_jsonl(data: bytes) -> list[dict]:
    """The records of a JSONL file; raises InvalidDataset naming each bad line and its problem.

    Blank lines are skipped (a trailing newline, or one between records, is not an error).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InvalidDataset(f"line {line}: not valid UTF-8") from None
    records, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            check_record(record)
        except json.JSONDecodeError as e:
            errors.append(f"line {number}: invalid JSON: {e.msg} (column {e.colno})")
        except RecursionError:  # json's parser recurses once per nesting level
            errors.append(f"line {number}: invalid JSON: nested too deeply")
        except ValueError as e:
            errors.append(f"line {number}: {e}")
        else:
            records.append(record)
    if errors:
        more = len(errors) - MAX_REPORTED_ERRORS
        shown = errors[:MAX_REPORTED_ERRORS] + ([f"... and {more} more"] if more > 0 else [])
        raise InvalidDataset("invalid dataset:\n" + "\n".join(shown))
    if not records:
        raise InvalidDataset("empty dataset: the file has no records")
    return records


def check_record(record: object) -> None:
    """Raise ValueError saying what is wrong with one record (without the line number)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_type_name(record)}")
    fields = set(record)
    if "messages" in fields:
        _check_fields(fields, CHAT_FIELDS, "a chat record")
        _check_messages(record["messages"])
    elif fields & COMPLETION_FIELDS:
        _check_fields(fields, COMPLETION_FIELDS, "a prompt/completion record")
        for name in ("prompt", "completion"):
            _check_text(record[name], name)
    else:
        raise ValueError('expected "messages" (chat) or "prompt" and "completion"')


def as_messages(record: dict) -> list[dict]:
    """A valid record as chat messages: a completion record becomes a user turn and its answer."""
    if "messages" in record:
        return record["messages"]
    return [
        {"role": "user", "content": record["prompt"]},
        {"role": ASSISTANT, "content": record["completion"]},
    ]


def _check_fields(fields: set[str], expected: set[str], kind: str) -> None:
    if missing := sorted(expected - fields):
        raise ValueError(f"{kind} is missing {', '.join(map(repr, missing))}")
    if extra := sorted(fields - expected):
        raise ValueError(f"unexpected field {', '.join(map(repr, extra))} in {kind}")


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list):
        raise ValueError(f'"messages" must be a list, got {_type_name(messages)}')
    if not messages:
        raise ValueError('"messages" is empty')
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object, got {_type_name(message)}")
        _check_fields(set(message), MESSAGE_FIELDS, where)
        if message["role"] not in ROLES:
            raise ValueError(
                f"{where}.role is {message['role']!r}; expected one of {', '.join(ROLES)}"
            )
        _check_text(message["content"], f"{where}.content")
    if not any(message["role"] == ASSISTANT for message in messages):
        raise ValueError("no assistant message: there is nothing to learn from this record")


def _check_text(value: object, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise ValueError(f"{where} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON's \ud800-style escapes can spell half a character
        raise ValueError(f"{where} holds a lone surrogate escape (\\ud800-\\udfff), "
                         "not text") from None


def _type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
