"""ARC and MMLU: the multiple-choice format, grading, builtin data and the Hub loaders."""

import pytest

from training.tasks.arc import ARC
from training.tasks.base import MissingSplitError
from training.tasks.mmlu import MMLU, generate_aux
from training.tasks.multiple_choice import multiple_choice_conversation, render_multiple_choice


def test_render_lists_each_choice_with_its_letter_and_asks_for_a_letter():
    text = render_multiple_choice("Which is a fruit?", ["rock", "pear", "car"], ["A", "B", "C"])
    assert text == (
        "Multiple Choice question: Which is a fruit?\n- rock=A\n- pear=B\n- car=C\n\n"
        "Respond only with the letter of the correct answer."
    )


def test_conversation_has_gold_letter_and_allowed_letters():
    conversation = multiple_choice_conversation("Q?", ["x", "y", "z", "w", "v"], 4, subject="s")
    assert conversation["letters"] == ["A", "B", "C", "D", "E"]
    assert conversation["messages"][-1] == {"role": "assistant", "content": "E"}
    assert conversation["subject"] == "s"
    with pytest.raises(ValueError, match="answer index 3 is not one of the 3 choices"):
        multiple_choice_conversation("Q?", ["x", "y", "z"], 3)


def test_rendered_conversation_trains_only_on_the_answer_letter(tokenizer):
    task = ARC("ARC-Easy", "test")
    conversation = task[0]
    ids, mask = tokenizer.render_conversation(conversation)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert (
        tokenizer.decode(trained) == conversation["messages"][-1]["content"] + "<|assistant_end|>"
    )
    prompt = tokenizer.render_for_completion(conversation)
    assert prompt == ids[: len(prompt)]
    assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>")
    assert "Multiple Choice question:" in tokenizer.decode(prompt)


@pytest.mark.parametrize(
    "task",
    [
        ARC("ARC-Easy", "test"),
        ARC("ARC-Challenge", "test"),
        MMLU("all", "test"),
        MMLU("auxiliary_train", "train"),
    ],  # fmt: skip
    ids=lambda t: t.name,
)
def test_categorical_tasks_grade_the_letter(task):
    assert task.eval_type == "categorical"
    assert len(task) >= 14
    for conversation in task:
        gold = conversation["messages"][-1]["content"]
        assert gold in conversation["letters"]
        assert task.evaluate(conversation, gold) is True
        assert task.evaluate(conversation, f" {gold}\n") is True
        wrong = next(letter for letter in conversation["letters"] if letter != gold)
        assert task.evaluate(conversation, wrong) is False
        assert task.reward(conversation, wrong) == 0.0


def test_builtin_answers_are_not_all_one_letter():
    for task in (ARC("ARC-Easy", "test"), ARC("ARC-Challenge", "test"), MMLU("all", "test")):
        golds = {c["messages"][-1]["content"] for c in task}
        assert golds == {"A", "B", "C", "D"}, task.name


def test_builtin_train_and_test_are_disjoint():
    for subset in ("ARC-Easy", "ARC-Challenge"):
        train = {c["messages"][0]["content"] for c in ARC(subset, "train")}
        test = {c["messages"][0]["content"] for c in ARC(subset, "test")}
        assert train and test and not train & test
    aux = {c["messages"][0]["content"] for c in MMLU("auxiliary_train", "train")}
    assert not aux & {c["messages"][0]["content"] for c in MMLU("all", "test")}


def test_mmlu_has_subjects_and_no_train_split():
    task = MMLU("all", "test")
    assert len(task) == 40
    assert len(task.subjects) == 8
    with pytest.raises(MissingSplitError, match="MMLU has no 'train' split.*mmlu_aux"):
        MMLU("all", "train")
    with pytest.raises(MissingSplitError, match="MMLU-aux has no 'test' split"):
        MMLU("auxiliary_train", "test")


def test_generated_aux_questions_are_deterministic_distinct_and_correct():
    first, again = generate_aux(200, seed=3), generate_aux(200, seed=3)
    assert first == again
    assert generate_aux(200, seed=4) != first
    questions = [(c["messages"][0]["content"]) for c in first]
    assert len(set(questions)) == 200
    checked = 0
    for conversation in first:
        text = conversation["messages"][0]["content"]
        gold = conversation["messages"][-1]["content"]
        if " plus " in text or " times " in text or " minus " in text:
            a, word, b = (
                text.removeprefix("Multiple Choice question: What is ").split("?")[0].split()
            )
            value = {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}
            assert f"- {value[word]}={gold}\n" in text
            checked += 1
    assert checked > 10


def test_arc_hub_loader_reads_parquet_and_maps_numeric_labels(fake_hub, tmp_path):
    rows = [
        {"id": "q1", "question": "What is warm?",
         "choices": {"text": ["ice", "sun", "snow"], "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"id": "q2", "question": "Pick four.",
         "choices": {"text": ["1", "2", "3", "4"], "label": ["1", "2", "3", "4"]},
         "answerKey": "4"},
    ]  # fmt: skip
    fake_hub.add_parquet("allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet", rows)
    task = ARC("ARC-Easy", "test", source="hub", cache_dir=tmp_path / "cache")
    assert len(task) == 2
    assert task[0]["letters"] == ["A", "B", "C"]
    assert task[0]["messages"][-1]["content"] == "B"
    assert "- sun=B" in task[0]["messages"][0]["content"]
    assert task[1]["messages"][-1]["content"] == "D"
    assert task.evaluate(task[1], "D")


def test_arc_hub_row_with_unknown_answer_names_the_row(fake_hub, tmp_path):
    row = {"id": "x", "question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
           "answerKey": "E"}  # fmt: skip
    fake_hub.add_parquet("allenai/ai2_arc", "ARC-Challenge/train-00000-of-00001.parquet", [row])
    with pytest.raises(ValueError, match=r"ARC-Challenge/train row 0: answer 'E' is not one"):
        ARC("ARC-Challenge", "train", source="hub", cache_dir=tmp_path / "cache")


def test_mmlu_hub_loader_reads_test_and_wrapped_aux_rows(fake_hub, tmp_path):
    row = {"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
    fake_hub.add_parquet("cais/mmlu", "all/test-00000-of-00001.parquet", [row, row])
    fake_hub.add_parquet("cais/mmlu", "all/auxiliary_train-00000-of-00001.parquet",
                         [{"train": row}])  # fmt: skip
    test = MMLU("all", "test", source="hub", cache_dir=tmp_path)
    assert len(test) == 2 and test.subjects == ["math"]
    assert test[0]["messages"][-1]["content"] == "B"
    aux = MMLU("auxiliary_train", "train", source="hub", cache_dir=tmp_path)
    assert len(aux) == 1 and aux[0]["messages"][-1]["content"] == "B"
