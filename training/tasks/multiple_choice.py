"""The multiple-choice format shared by ARC and MMLU.

The question and its lettered choices go in one user message and the assistant answers with
the letter alone. Evaluation never lets the model write free text: the grader compares the
logits of the allowed letters at the answer position (the conversation's "letters" key says
which), so the chosen letter is all `evaluate` receives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from training.tasks.base import Task

LETTERS = "ABCDEFGHIJ"


def render_multiple_choice(question: str, choices: Sequence[str], letters: Sequence[str]) -> str:
    """The user message: the question, one "- choice=LETTER" line per choice, an instruction.

    The letter comes after its choice so that, reading left to right, the model has seen the
    choice text by the time it sees the letter it must later produce.
    """
    lines = [f"Multiple Choice question: {question.strip()}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices, strict=True)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def multiple_choice_conversation(
    question: str, choices: Sequence[str], answer: int, **extra: Any
) -> dict[str, Any]:
    """A categorical conversation: the question, the gold letter, and the allowed letters."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2-{len(LETTERS)} choices: {question!r}")
    if not 0 <= answer < len(choices):
        raise ValueError(f"answer index {answer} is not one of the {len(choices)} choices")
    letters = list(LETTERS[: len(choices)])
    return {
        "messages": [
            {"role": "user", "content": render_multiple_choice(question, choices, letters)},
            {"role": "assistant", "content": letters[answer]},
        ],
        "letters": letters,
        **extra,
    }


class MultipleChoiceTask(Task):
    """A categorical task: `evaluate` gets the chosen letter and compares it with the gold one."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict[str, Any], completion: str) -> bool:
        gold = conversation["messages"][-1]["content"]
        return completion.strip() == gold
