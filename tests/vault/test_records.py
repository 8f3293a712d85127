"""Dataset validation: every problem is reported with its line number."""

import pytest

from loraplex.vault import InvalidDataset, as_messages, parse_jsonl
from tests.vault.conftest import CHAT, jsonl

USER = {"role": "user", "content": "hi"}
ANSWER = {"role": "assistant", "content": "hello"}


def test_valid_chat_and_completion_records():
    records = parse_jsonl(CHAT + b"\n  \n")  # blank lines are not records
    assert len(records) == 2
    assert as_messages(records[1]) == [{"role": "user", "content": "Say hi."},
                                       {"role": "assistant", "content": "Hi!"}]
    assert as_messages(records[0]) is records[0]["messages"]


@pytest.mark.parametrize(("line", "problem"), [
    (b'{"messages": [', "invalid JSON"),
    (b"[1, 2]", "expected a JSON object, got a list"),
    (b'{"text": "hi"}', 'expected "messages" (chat) or "prompt" and "completion"'),
    (jsonl({"prompt": "hi"}), "a prompt/completion record is missing 'completion'"),
    (jsonl({"prompt": "hi", "completion": 3}), "completion must be a string, got a number"),
    (jsonl({"prompt": "hi", "completion": "  "}), "completion is empty"),
    (jsonl({"messages": [ANSWER], "prompt": "x"}), "unexpected field 'prompt' in a chat record"),
    (jsonl({"messages": "hi"}), '"messages" must be a list, got a string'),
    (jsonl({"messages": []}), '"messages" is empty'),
    (jsonl({"messages": ["hi", ANSWER]}), "messages[0] must be an object"),
    (jsonl({"messages": [{"role": "user"}, ANSWER]}), "messages[0] is missing 'content'"),
    (jsonl({"messages": [{"role": "tool", "content": "x"}, ANSWER]}),
     "messages[0].role is 'tool'; expected one of system, user, assistant"),
    (jsonl({"messages": [USER, {"role": "assistant", "content": ""}]}),
     "messages[1].content is empty"),
    (jsonl({"messages": [USER, {"role": "assistant", "content": None}]}),
     "messages[1].content must be a string, got null"),
    (jsonl({"messages": [USER]}), "no assistant message"),
])
def test_errors_name_the_line_and_the_problem(line, problem):
    data = CHAT + b"\n" + line.strip() + b"\n" + CHAT  # the bad record is on line 4
    with pytest.raises(InvalidDataset) as error:
        parse_jsonl(data)
    assert f"line 4: {problem}" in str(error.value)


def test_every_bad_line_is_reported_up_to_a_limit():
    with pytest.raises(InvalidDataset) as error:
        parse_jsonl(b"nope\n" * 25)
    message = str(error.value)
    assert "line 1: invalid JSON" in message and "line 10: invalid JSON" in message
    assert "line 11" not in message and "and 15 more" in message


def test_empty_file():
    for data in (b"", b"\n \n"):
        with pytest.raises(InvalidDataset, match="empty dataset"):
            parse_jsonl(data)


def test_invalid_utf8_names_the_line():
    with pytest.raises(InvalidDataset, match="line 3: not valid UTF-8"):
        parse_jsonl(CHAT + b'{"prompt": "\xff"}\n')


def test_deep_nesting_is_a_line_error():  # was a RecursionError (found by fuzzing)
    with pytest.raises(InvalidDataset, match="line 2: invalid JSON: nested too deeply"):
        parse_jsonl(CHAT.splitlines()[0] + b"\n" + b"[" * 100_000 + b"\n")


def test_lone_surrogate_is_refused():  # accepted, then a TypeError in training's tokenizer
    with pytest.raises(InvalidDataset, match="line 1: prompt holds a lone surrogate"):
        parse_jsonl(b'{"prompt": "a\\ud800", "completion": "b"}\n')
