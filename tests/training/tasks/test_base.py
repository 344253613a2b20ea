"""Task slicing, mixtures and sequences."""

import pytest

from training.tasks.base import ListTask, Task, TaskMixture, TaskSequence


class Numbers(ListTask):
    """n conversations whose answer is their index; graded by exact match."""

    eval_type = "generative"

    def __init__(self, n: int, name: str = "Numbers", **slicing):
        super().__init__(**slicing)
        self.name = name
        self._data = [
            {
                "messages": [
                    {"role": "user", "content": f"{name} {i}?"},
                    {"role": "assistant", "content": str(i)},
                ]
            }  # fmt: skip
            for i in range(n)
        ]

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


def answers(task: Task) -> list[str]:
    return [c["messages"][-1]["content"] for c in task]


@pytest.mark.parametrize(
    ("slicing", "expected"),
    [
        ({}, list(range(10))),
        ({"start": 3}, list(range(3, 10))),
        ({"stop": 4}, [0, 1, 2, 3]),
        ({"start": 2, "stop": 9, "step": 3}, [2, 5, 8]),
        ({"stop": 1000}, list(range(10))),  # clamped to what the data has
        ({"start": 20}, []),
        ({"start": 4, "stop": 4}, []),
    ],
)
def test_slicing_selects_like_a_python_slice(slicing, expected):
    task = Numbers(10, **slicing)
    assert len(task) == len(expected)
    assert answers(task) == [str(i) for i in expected]
    assert [task[i]["messages"][-1]["content"] for i in range(len(task))] == answers(task)


def test_indexing_supports_negative_indices_and_rejects_out_of_range():
    task = Numbers(10, start=2, step=2)  # 2 4 6 8
    assert task[-1]["messages"][-1]["content"] == "8"
    assert task[-4]["messages"][-1]["content"] == "2"
    with pytest.raises(IndexError, match="Numbers index 4 out of range for 4"):
        task[4]
    with pytest.raises(IndexError):
        task[-5]
    with pytest.raises(TypeError, match="must be ints"):
        task["0"]


@pytest.mark.parametrize(
    ("slicing", "message"),
    [
        ({"start": -1}, "start must be >= 0, got -1"),
        ({"step": 0}, "step must be >= 1, got 0"),
        ({"start": 5, "stop": 2}, r"stop \(2\) must be >= start \(5\)"),
        ({"stop": 2.5}, "stop must be an int or None"),
        ({"start": True}, "start must be an int"),
    ],
)
def test_bad_slice_arguments_are_rejected_with_a_clear_message(slicing, message):
    with pytest.raises(ValueError, match=message):
        Numbers(3, **slicing)


def test_examples_are_copies_so_callers_cannot_corrupt_the_task():
    task = Numbers(3)
    task[0]["messages"].pop()
    assert len(task[0]["messages"]) == 2


def test_reward_is_evaluate_as_a_float():
    task = Numbers(3)
    assert task.reward(task[1], "1") == 1.0
    assert task.reward(task[1], "2") == 0.0


def test_mixture_holds_every_example_once_in_a_seed_determined_order():
    a, b = Numbers(5, name="A"), Numbers(3, name="B")
    mixture = TaskMixture([a, b], seed=7)
    contents = [c["messages"][0]["content"] for c in mixture]
    assert sorted(contents) == sorted([f"A {i}?" for i in range(5)] + [f"B {i}?" for i in range(3)])
    again = [c["messages"][0]["content"] for c in TaskMixture([a, b], seed=7)]
    other = [c["messages"][0]["content"] for c in TaskMixture([a, b], seed=8)]
    assert contents == again
    assert contents != other
    # Shuffled, not concatenated.
    assert contents != [f"A {i}?" for i in range(5)] + [f"B {i}?" for i in range(3)]


def test_listing_a_task_twice_upweights_it():
    a, b = Numbers(4, name="A"), Numbers(4, name="B")
    mixture = TaskMixture([a, a, b])
    contents = [c["messages"][0]["content"] for c in mixture]
    assert len(mixture) == 12
    assert sum(c.startswith("A") for c in contents) == 8
    assert contents.count("A 3?") == 2 and contents.count("B 3?") == 1


def test_mixture_can_be_sliced_and_routes_grading_to_the_owning_task():
    a, b = Numbers(4, name="A"), Numbers(4, name="B")
    mixture = TaskMixture([a, b], stop=5)
    assert len(mixture) == 5
    for i, conversation in enumerate(mixture):
        owner = mixture.task_at(i)
        assert conversation["task"] == owner.name
        assert conversation["messages"][0]["content"].startswith(owner.name)
        gold = conversation["messages"][-1]["content"]
        assert mixture.evaluate(conversation, gold) is True
        assert mixture.reward(conversation, gold + "0") == 0.0


def test_sequence_concatenates_in_order():
    sequence = TaskSequence([Numbers(2, name="A"), Numbers(3, name="B", start=1)])
    assert [c["messages"][0]["content"] for c in sequence] == ["A 0?", "A 1?", "B 1?", "B 2?"]
    assert sequence.eval_type == "generative"
    assert sequence.name == "A+B"


def test_composites_reject_no_tasks_and_non_tasks():
    with pytest.raises(ValueError, match="at least one task"):
        TaskMixture([])
    with pytest.raises(ValueError, match="takes Task objects, got list"):
        TaskSequence([[{"messages": []}]])
