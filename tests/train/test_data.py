"""Training examples: only the assistant's tokens are targets, tokenized as serving sees them."""

import json

import pytest

from loraplex.model.tokenizer import Tokenizer
from loraplex.train.data import IGNORE, Example, build_examples, collate, split
from loraplex.train.trainer import TrainingError

USER = {"role": "user", "content": "Hi"}
SYSTEM = {"role": "system", "content": "Be brief."}


def targets_text(tokenizer, example: Example) -> list[str]:
    """The decoded runs of labelled tokens, in order."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.fixture
def tokenizer(tiny_llama_dir):
    return Tokenizer(tiny_llama_dir)


def test_only_the_assistant_turns_are_targets(tokenizer):
    messages = [SYSTEM, USER, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao."}]
    (example,) = build_examples(tokenizer, [{"messages": messages}], max_length=1024)
    # The tiny tokenizer has no newline token: "\n" becomes <unk>.
    assert targets_text(tokenizer, example) == ["Hello!<|im_end|><unk>", "Ciao.<|im_end|><unk>"]
    # The context of the first answer is exactly the prompt the engine encodes for a request.
    prompt = tokenizer.encode_chat(messages[:2])
    assert example.input_ids[: len(prompt)] == prompt
    assert example.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert tokenizer.decode(example.input_ids, skip_special_tokens=False) == (
        tokenizer.apply_chat_template(messages, add_generation_prompt=False).replace("\n", "<unk>"))


def test_prompt_completion_is_one_user_turn_and_its_answer(tokenizer):
    (example,) = build_examples(tokenizer, [{"prompt": "Hi", "completion": "Yo"}], 1024)
    (chat,) = build_examples(
        tokenizer, [{"messages": [USER, {"role": "assistant", "content": "Yo"}]}], 1024)
    assert example == chat


def test_long_examples_are_cut(tokenizer):
    record = {"prompt": "Hi", "completion": "x" * 50}
    (example,) = build_examples(tokenizer, [record], max_length=20)
    assert len(example.input_ids) == len(example.labels) == 20


def test_template_that_cannot_be_cut_turn_by_turn(tmp_path, tiny_llama_dir):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    # Like SmolLM2's: a default system prompt only once there is a first message.
    template = ("{% for m in messages %}{% if loop.first %}SYS {% endif %}"
                "{{ m['role'] }}: {{ m['content'] }} "
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    records = [{"prompt": "Hi", "completion": "Yo"},
               {"messages": [{"role": "assistant", "content": "Yo"}]}]
    with pytest.raises(TrainingError, match="record 2: the chat template does not render"):
        build_examples(Tokenizer(tmp_path), records, 1024)


def test_split_is_seeded_and_keeps_one_to_train_on():
    train, held_out = split(20, 0.1, seed=0)
    assert len(held_out) == 2 and sorted(train + held_out) == list(range(20))
    assert split(20, 0.1, seed=0) == (train, held_out)
    assert split(20, 0.1, seed=1) != (train, held_out)
    assert split(3, 0.01, seed=0)[1] != []  # at least one held out
    assert split(3, 0.0, seed=0)[1] == []
    with pytest.raises(TrainingError, match="nothing to train on"):
        split(1, 0.5, seed=0)


def test_collate_pads_right_and_masks_padding():
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [IGNORE])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
