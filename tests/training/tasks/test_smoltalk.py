"""SmolTalk: generated builtin conversations and the Hub loader."""

import json

import pytest

from training.tasks.base import MissingSplitError
from training.tasks.smoltalk import SmolTalk, generate_builtin


def as_keys(task):
    return [json.dumps(c, sort_keys=True) for c in task]


def test_builtin_is_deterministic_varied_and_train_test_disjoint():
    train, test = SmolTalk("train"), SmolTalk("test")
    assert len(train) == 240 and len(test) == 48
    assert as_keys(SmolTalk("train")) == as_keys(train)
    assert len(set(as_keys(train))) == 240
    assert not set(as_keys(train)) & set(as_keys(test))
    firsts = {c["messages"][0]["content"] for c in train}
    assert len(firsts) > 120
    assert any(c["messages"][0]["role"] == "system" for c in train)
    assert any(len(c["messages"]) >= 4 for c in train)
    with pytest.raises(NotImplementedError):
        train.evaluate(train[0], "hi")
    with pytest.raises(MissingSplitError, match="SmolTalk has no 'validation' split"):
        SmolTalk("validation")


def test_computed_answers_are_right():
    checked = 0
    for conversation in generate_builtin("train", 400):
        user = next(m["content"] for m in conversation["messages"] if m["role"] == "user")
        answer = next(m["content"] for m in conversation["messages"] if m["role"] == "assistant")
        checked += 1
        if user.startswith("Sort these words alphabetically: "):
            words = user.split(": ", 1)[1].split(", ")
            assert answer.endswith(", ".join(sorted(words)) + ".")
        elif user.startswith("What is ") and " times " in user:
            a, b = user.removeprefix("What is ").rstrip("?").split(" times ")
            assert answer == f"{a} times {b} is {int(a) * int(b)}."
        elif user.startswith("Convert this to uppercase: "):
            assert answer == user.split(": ", 1)[1].upper()
        else:
            checked -= 1
    assert checked > 20


def test_every_builtin_conversation_renders(tokenizer):
    for conversation in [*SmolTalk("train"), *SmolTalk("test")]:
        ids, mask = tokenizer.render_conversation(conversation)
        assert 0 < sum(mask) < len(ids)


def test_hub_loader_reads_messages_lazily(fake_hub, tmp_path):
    rows = [
        {"messages": [{"content": "hi", "role": "user"}, {"content": "hello", "role": "assistant"}],
         "source": "x"},
        {"messages": [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}],
         "source": "y"},
    ]  # fmt: skip
    fake_hub.add_parquet("HuggingFaceTB/smol-smoltalk", "data/train-00000-of-00002.parquet", rows)
    fake_hub.add_parquet("HuggingFaceTB/smol-smoltalk", "data/train-00001-of-00002.parquet",
                         rows[:1])  # fmt: skip
    fake_hub.add_parquet("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet", rows)
    task = SmolTalk("train", source="hub", cache_dir=tmp_path / "cache")
    assert len(task) == 3
    assert task[1] == {"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a"}]}  # fmt: skip
    assert task[2]["messages"][0]["content"] == "hi"
    assert len(SmolTalk("test", source="hub", cache_dir=tmp_path / "cache")) == 2
