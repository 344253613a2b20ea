"""The Task API: a sliceable list of conversations plus how to grade an answer to one.

A task is consumed three ways: SFT reads its conversations (`len` and indexing, like a list),
chat evaluation renders each one for completion and grades what the model said with
`evaluate`, and RL turns the grade into a `reward`. Subclasses only say how many examples the
underlying data has (`num_examples`) and how to build example `i` (`get_example`); the base
class maps the user's `start:stop:step` view onto that, so every task slices the same way.

Mixtures shuffle their tasks' examples once with a fixed seed, so every rank and every resumed
run sees the same order; listing a task twice in a mixture makes its examples appear twice,
which is how a small dataset is upweighted.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Sequence
from typing import Any

EVAL_TYPES = ("generative", "categorical")
SOURCES = ("builtin", "hub")


class MissingSplitError(ValueError):
    """A task was asked for a split it does not have (HumanEval has no train split, ...)."""


def check_split(task: str, split: str, available: Sequence[str], hint: str = "") -> None:
    """Raise MissingSplitError naming the task and the split unless `split` is available."""
    if split not in available:
        raise MissingSplitError(
            f"{task} has no {split!r} split; it has {', '.join(map(repr, available))}{hint}"
        )


def check_source(source: str) -> None:
    """Reject a data source other than "builtin" (offline, shipped) and "hub" (downloaded)."""
    if source not in SOURCES:
        raise ValueError(f"task source must be one of {SOURCES}, got {source!r}")


def _check_slice(start: Any, stop: Any, step: Any) -> None:
    for name, value in (("start", start), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"task slice {name} must be an int, got {value!r}")
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int)):
        raise ValueError(f"task slice stop must be an int or None, got {stop!r}")
    if start < 0:
        raise ValueError(f"task slice start must be >= 0, got {start}")
    if stop is not None and stop < start:
        raise ValueError(f"task slice stop ({stop}) must be >= start ({start})")
    if step < 1:
        raise ValueError(f"task slice step must be >= 1, got {step}")


class Task:
    """A sliceable list of conversations plus how to grade a model's answer to one.

    `start`, `stop` and `step` select examples of the underlying data like `data[start:stop:step]`
    (a `stop` past the end is clamped, so `stop=5000` means "at most 5000" on any source).

    Subclasses set `name` and `eval_type` and implement `num_examples` and `get_example`;
    `evaluate` (and `reward`, for RL) where the task can be graded.
    """

    name: str = "Task"
    eval_type: str = "generative"  # "generative" | "categorical"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1) -> None:
        _check_slice(start, stop, step)
        self.start, self.stop, self.step = start, stop, step
        self._range: range | None = None

    # ---- what subclasses provide ----------------------------------------------------------

    def num_examples(self) -> int:
        """How many examples the underlying data has, before slicing."""
        raise NotImplementedError

    def get_example(self, index: int) -> dict[str, Any]:
        """Example `index` (0 <= index < num_examples()) of the underlying data."""
        raise NotImplementedError

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        """Whether `completion` answers `conversation` correctly.

        Generative tasks get the assistant's generated text (tool parts flattened to text);
        categorical tasks get the chosen letter, e.g. "B".
        """
        raise NotImplementedError(f"{self.name} has no grader (it is a training-only task)")

    def reward(self, conversation: dict[str, Any], completion: str) -> float:
        """The RL reward of `completion`: 1.0 when `evaluate` says correct, else 0.0."""
        return float(self.evaluate(conversation, completion))

    # ---- the sliced view ------------------------------------------------------------------

    @property
    def indices(self) -> range:
        """Indices into the underlying data that this (sliced) task covers."""
        if self._range is None:
            total = self.num_examples()
            stop = total if self.stop is None else min(self.stop, total)
            self._range = range(min(self.start, stop), stop, self.step)
        return self._range

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"{self.name} indices must be ints, got {type(index).__name__}")
        indices = self.indices
        if not -len(indices) <= index < len(indices):
            raise IndexError(f"{self.name} index {index} out of range for {len(indices)} examples")
        return self.get_example(indices[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in self.indices:
            yield self.get_example(index)

    def __repr__(self) -> str:
        view = f"{self.start}:{'' if self.stop is None else self.stop}:{self.step}"
        return f"<{type(self).__name__} {self.name} [{view}] {len(self)} examples>"


class ListTask(Task):
    """A task over an in-memory list of conversations (most builtin and Hub sources).

    Subclasses fill `self._data`. Examples are handed out as deep copies: a caller that edits
    one (say, dropping the gold answer to build a prompt) must not change what the next reader
    of the task sees.
    """

    _data: list[dict[str, Any]]

    def num_examples(self) -> int:
        return len(self._data)

    def get_example(self, index: int) -> dict[str, Any]:
        return copy.deepcopy(self._data[index])


def _tagged(conversation: dict[str, Any], task: Task) -> dict[str, Any]:
    # A shallow copy that remembers its task, so a mixture can route grading to it.
    return {**conversation, "task": conversation.get("task", task.name)}


class _Composite(Task):
    """Shared code of mixtures and sequences: examples are (task, index) pairs."""

    def __init__(self, tasks: Sequence[Task], **slicing: Any) -> None:
        tasks = list(tasks)
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        for task in tasks:
            if not isinstance(task, Task):
                raise ValueError(
                    f"{type(self).__name__} takes Task objects, got {type(task).__name__}"
                )
        super().__init__(**slicing)
        self.tasks = tasks
        kinds = {task.eval_type for task in tasks}
        self.eval_type = kinds.pop() if len(kinds) == 1 else "mixed"
        self.name = "+".join(dict.fromkeys(task.name for task in tasks))
        self._index_map = self._build_index_map()

    def _build_index_map(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def num_examples(self) -> int:
        return len(self._index_map)

    def get_example(self, index: int) -> dict[str, Any]:
        task_index, local = self._index_map[index]
        task = self.tasks[task_index]
        return _tagged(task[local], task)

    def task_at(self, index: int) -> Task:
        """The task that example `index` of this (sliced) view comes from."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name} index {index} out of range for {len(self)} examples")
        return self.tasks[self._index_map[self.indices[index]][0]]

    def _owner(self, conversation: dict[str, Any]) -> Task:
        name = conversation.get("task")
        for task in self.tasks:
            if task.name == name:
                return task
        if len({task.name for task in self.tasks}) == 1:
            return self.tasks[0]
        raise ValueError(
            f"cannot tell which of {[t.name for t in self.tasks]} this conversation belongs to: "
            f"grade conversations taken from this {type(self).__name__} (they carry a 'task' key)"
        )

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        return self._owner(conversation).evaluate(conversation, completion)

    def reward(self, conversation: dict[str, Any], completion: str) -> float:
        return self._owner(conversation).reward(conversation, completion)


class TaskMixture(_Composite):
    """Every example of every task, shuffled once with `seed` (a task listed twice: twice)."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **slicing: Any) -> None:
        self.seed = seed
        super().__init__(tasks, **slicing)

    def _build_index_map(self) -> list[tuple[int, int]]:
        index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(self.seed).shuffle(index_map)
        return index_map


class TaskSequence(_Composite):
    """The tasks' examples one task after another, in order (a curriculum)."""

    def _build_index_map(self) -> list[tuple[int, int]]:
        return [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
