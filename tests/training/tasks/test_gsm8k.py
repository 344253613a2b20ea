"""GSM8K: reference answers as tool calls, answer extraction, grading, builtin problems."""

import pytest

from engine.calculator import evaluate_expression
from training.tasks.gsm8k import (
    GSM8K,
    answer_to_parts,
    extract_answer,
    generate_builtin,
    make_conversation,
    message_text,
)

REFERENCE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


def test_reference_annotations_become_python_and_output_parts():
    assert answer_to_parts(REFERENCE) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]


def test_annotation_edge_cases():
    # Back-to-back annotations, one at the very start, and a result with '=' inside the expr.
    assert answer_to_parts("<<2*3=6>><<a==b=1>>x") == [
        {"type": "python", "text": "2*3"},
        {"type": "python_output", "text": "6"},
        {"type": "python", "text": "a==b"},
        {"type": "python_output", "text": "1"},
        {"type": "text", "text": "x"},
    ]
    # Without '=' an annotation is not a calculation and stays text.
    assert answer_to_parts("see <<note>> here\n#### 1") == [
        {"type": "text", "text": "see <<note>> here\n#### 1"}
    ]


def test_rendering_trains_on_the_tool_call_but_not_on_its_output(tokenizer):
    ids, mask = tokenizer.render_conversation(make_conversation("How many clips?", REFERENCE))
    special = tokenizer.encode_special
    start, end = ids.index(special("<|output_start|>")), ids.index(special("<|output_end|>"))
    assert tokenizer.decode(ids[start + 1 : end]) == "24"
    assert set(mask[start : end + 1]) == {0}
    call = ids.index(special("<|python_start|>"))
    assert tokenizer.decode(ids[call + 1 : ids.index(special("<|python_end|>"))]) == "48/2"
    assert mask[call] == 1
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained.endswith("#### 72<|assistant_end|>")
    assert "24 clips in May" in trained


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### -5 apples", "-5"),
        ("#### $18.50.", "18.50"),
        ("#### 3\nthen more text\n#### 4", "4"),
        ("no marker 42", None),
        ("#### nothing numeric", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_evaluate_and_reward_compare_the_final_number():
    task = GSM8K("test")
    conversation = make_conversation("How many clips?", REFERENCE)
    assert task.evaluate(conversation, "48/2 = 24, 24+48 = 72\n#### 72") is True
    assert task.evaluate(conversation, "#### 72.0") is True
    assert task.evaluate(conversation, "#### 71") is False
    assert task.evaluate(conversation, "The answer is 72") is False  # no "####"
    assert task.reward(conversation, "#### 72") == 1.0
    assert task.reward(conversation, "#### 7") == 0.0
    assert task.eval_type == "generative"


def test_builtin_problems_are_deterministic_disjoint_and_calculator_exact():
    train, test = GSM8K("train"), GSM8K("test")
    assert len(train) == 240 and len(test) == 60
    assert [c["messages"] for c in GSM8K("test")] == [c["messages"] for c in test]
    train_questions = {c["messages"][0]["content"] for c in train}
    test_questions = {c["messages"][0]["content"] for c in test}
    assert len(train_questions) == 240 and len(test_questions) == 60
    assert not train_questions & test_questions
    templates = set()
    for conversation in [*train, *test]:
        parts = conversation["messages"][-1]["content"]
        calls = [p["text"] for p in parts if p["type"] == "python"]
        outputs = [p["text"] for p in parts if p["type"] == "python_output"]
        assert calls and len(calls) == len(outputs)
        # What the model is trained to expect from the tool is what the tool prints.
        assert [evaluate_expression(c) for c in calls] == outputs
        assert extract_answer(message_text(parts)) == outputs[-1]
        assert task_grades_own_answer(test, conversation)
        templates.add(conversation["messages"][0]["content"].split()[1])
    assert len(templates) > 8  # many different templates are in use


def task_grades_own_answer(task, conversation):
    return task.evaluate(conversation, message_text(conversation["messages"][-1]["content"]))


def test_builtin_size_option():
    assert len(generate_builtin("train", 10)) == 10
    assert len(GSM8K("train", size=30, stop=5)) == 5


def test_hub_loader_converts_rows(fake_hub, tmp_path):
    rows = [{"question": "How many clips?", "answer": REFERENCE}]
    fake_hub.add_parquet("openai/gsm8k", "main/test-00000-of-00001.parquet", rows)
    task = GSM8K("test", source="hub", cache_dir=tmp_path)
    assert len(task) == 1
    assert task[0]["messages"][-1]["content"] == answer_to_parts(REFERENCE)
    assert task.evaluate(task[0], "#### 72")
