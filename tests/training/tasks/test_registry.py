"""build_task, parse_mixture, the chat eval task list and ChatCORE."""

import json

import pytest

from training.tasks.base import MissingSplitError, TaskMixture
from training.tasks.registry import (
    CHATCORE_BASELINES,
    TASKS,
    build_task,
    chat_eval_tasks,
    chatcore,
    parse_mixture,
)

TRAIN_TASKS = ["arc_easy", "arc_challenge", "mmlu_aux", "gsm8k", "smoltalk", "identity",
               "spelling_bee", "simple_spelling"]  # fmt: skip
TEST_TASKS = ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "smoltalk",
              "spelling_bee", "simple_spelling"]  # fmt: skip


def test_every_named_task_exists():
    assert set(TASKS) == {"arc_easy", "arc_challenge", "mmlu", "mmlu_aux", "gsm8k", "humaneval",
                          "smoltalk", "identity", "spelling_bee", "simple_spelling",
                          "customjson"}  # fmt: skip


@pytest.mark.parametrize(("name", "split"), [(n, "train") for n in TRAIN_TASKS]
                         + [(n, "test") for n in TEST_TASKS])  # fmt: skip
def test_builtin_tasks_build_offline_and_render(name, split, tokenizer):
    task = build_task(name, split)
    assert len(task) > 0
    assert task.eval_type in ("generative", "categorical")
    for conversation in task:
        assert conversation["messages"][-1]["role"] == "assistant"
        ids, mask = tokenizer.render_conversation(conversation)
        assert 0 < sum(mask) < len(ids)
        prompt = tokenizer.render_for_completion(conversation)
        assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>")


@pytest.mark.parametrize(("name", "split"), [("mmlu", "train"), ("mmlu_aux", "test"),
                                             ("humaneval", "train"), ("identity", "test")])  # fmt: skip
def test_missing_splits_raise_naming_task_and_split(name, split):
    with pytest.raises(MissingSplitError, match=f"has no '{split}' split"):
        build_task(name, split)


def test_build_task_slicing_options_and_bad_arguments(tmp_path):
    assert len(build_task("gsm8k", "test", start=10, stop=20, step=2)) == 5
    assert len(build_task("spelling_bee", "train", size=7)) == 7
    assert len(build_task("spelling_bee", "test")) == 100
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: arc_easy, "):
        build_task("nope", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        build_task("gsm8k", "val")
    with pytest.raises(ValueError, match="task source must be one of"):
        build_task("gsm8k", "train", source="internet")
    with pytest.raises(ValueError, match=r"task arc_easy does not take \['size'\]"):
        build_task("arc_easy", "train", size=3)
    with pytest.raises(ValueError, match="only customjson takes a path"):
        build_task("gsm8k", "train", path=tmp_path)
    with pytest.raises(ValueError, match="customjson needs the path"):
        build_task("customjson", "train")


def test_parse_mixture_upweights_repeated_tasks_and_is_deterministic():
    mixture = parse_mixture("identity*2,gsm8k", "train")
    assert isinstance(mixture, TaskMixture)
    assert len(mixture) == 2 * len(build_task("identity", "train")) + 240
    names = [c["task"] for c in mixture]
    assert names.count("Identity") == 2 * len(build_task("identity", "train"))
    again = parse_mixture(" identity * 2 , gsm8k ", "train")
    assert [c["messages"] for c in again] == [c["messages"] for c in mixture]
    reseeded = parse_mixture("identity*2,gsm8k", "train", seed=1)
    assert [c["messages"] for c in reseeded] != [c["messages"] for c in mixture]


def test_default_sft_mixture_builds_offline():
    spec = "smoltalk,mmlu_aux,gsm8k*2,identity*2,simple_spelling,spelling_bee"
    mixture = parse_mixture(spec, "train")
    assert len(mixture) == 240 + 300 + 2 * 240 + 2 * 41 + 300 + 300
    assert {c["task"] for c in mixture} == {"SmolTalk", "MMLU-aux", "GSM8K", "Identity",
                                            "SimpleSpelling", "SpellingBee"}  # fmt: skip
    # The same spec as a validation mixture: tasks without a test split are left out.
    val = parse_mixture(spec, "test", skip_missing_splits=True)
    assert {c["task"] for c in val} == {"SmolTalk", "GSM8K", "SimpleSpelling", "SpellingBee"}
    with pytest.raises(MissingSplitError, match="MMLU-aux has no 'test' split"):
        parse_mixture(spec, "test")


def test_parse_mixture_customjson_path(tmp_path):
    path = tmp_path / "mine v2.jsonl"
    line = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path.write_text(json.dumps(line) + "\n")
    mixture = parse_mixture(f"customjson:{path}*3", "train")
    assert len(mixture) == 3
    assert mixture[0]["messages"] == line
    with pytest.raises(ValueError, match="customjson: needs a file path"):
        parse_mixture("customjson:", "train")
    with pytest.raises(FileNotFoundError, match="missing.jsonl: conversation file not found"):
        parse_mixture(f"customjson:{tmp_path / 'missing.jsonl'}", "train")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "spec is empty"),
        ("gsm8k,,identity", "has an empty entry"),
        ("gsm8k,wiki", "unknown task 'wiki' in mixture; known tasks: arc_easy, arc_challenge"),
        ("gsm8k*0", "weight must be 1 to 1000"),
        ("gsm8k*1001", "weight must be 1 to 1000"),
        ("gsm8k:/x", "only customjson takes a ':path'"),
        ("mmlu_aux", None),
    ],
)
def test_parse_mixture_bad_specs(spec, message):
    if message is None:  # mmlu_aux alone has no test split: nothing is left
        with pytest.raises(ValueError, match="no task of mixture 'mmlu_aux' has a 'test' split"):
            parse_mixture(spec, "test", skip_missing_splits=True)
        return
    with pytest.raises(ValueError, match=message):
        parse_mixture(spec, "train")


def test_chat_eval_tasks_and_chatcore():
    assert chat_eval_tasks() == ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval",
                                 "spelling_bee"]  # fmt: skip
    assert set(CHATCORE_BASELINES) == set(chat_eval_tasks())
    assert CHATCORE_BASELINES["arc_easy"] == CHATCORE_BASELINES["mmlu"] == 0.25
    assert CHATCORE_BASELINES["gsm8k"] == 0.0
    assert chatcore({"arc_easy": 0.25, "gsm8k": 0.0}) == 0.0
    assert chatcore({"mmlu": 1.0, "humaneval": 1.0}) == 1.0
    assert chatcore({"arc_challenge": 0.625, "spelling_bee": 0.5}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no ChatCORE baseline for \\['smoltalk'\\]"):
        chatcore({"smoltalk": 0.5})
    with pytest.raises(ValueError, match="at least one task"):
        chatcore({})
