"""ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 answer choices.

Two subsets: ARC-Easy and ARC-Challenge (the questions simple retrieval and co-occurrence
methods got wrong). Hub: the parquet files of `allenai/ai2_arc`. Builtin: a few dozen questions
in the same style written for this project (`data/arc.json`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from training.tasks import hub
from training.tasks.base import ListTask, check_source, check_split
from training.tasks.multiple_choice import LETTERS, MultipleChoiceTask, multiple_choice_conversation

HUB_REPO = "allenai/ai2_arc"
SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "test")
BUILTIN_FILE = Path(__file__).parent / "data" / "arc.json"


def _row_to_conversation(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One Hub row -> conversation. A few ARC questions label choices 1-4 instead of A-D."""
    choices = row["choices"]
    texts, labels = list(choices["text"]), [str(label) for label in choices["label"]]
    key = str(row["answerKey"])
    if key not in labels:
        raise ValueError(f"{where}: answer {key!r} is not one of the choice labels {labels}")
    return multiple_choice_conversation(row["question"], texts, labels.index(key))


def load_builtin(subset: str, split: str) -> list[dict[str, Any]]:
    data = json.loads(BUILTIN_FILE.read_text(encoding="utf-8"))
    conversations = []
    for item in data[subset][split]:
        answer = LETTERS.index(item["answer"])
        conversations.append(
            multiple_choice_conversation(item["question"], item["choices"], answer)
        )
    return conversations


def load_hub(
    subset: str, split: str, cache_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    rows = hub.load_split(HUB_REPO, subset, f"{split}-", cache_dir)
    return [_row_to_conversation(row, f"{HUB_REPO} {subset}/{split} row {i}") for i, row in
            enumerate(rows)]  # fmt: skip


class ARC(MultipleChoiceTask, ListTask):
    """ARC-Easy or ARC-Challenge, one split."""

    def __init__(
        self,
        subset: str,
        split: str,
        source: str = "builtin",
        cache_dir: str | os.PathLike[str] | None = None,
        **slicing: Any,
    ) -> None:
        super().__init__(**slicing)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        check_split(subset, split, SPLITS)
        check_source(source)
        self.name, self.subset, self.split = subset, subset, split
        if source == "hub":
            self._data = load_hub(subset, split, cache_dir)
        else:
            self._data = load_builtin(subset, split)
