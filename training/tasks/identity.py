"""Identity conversations: who the model is, who trained it, what it can and cannot do.

A pretrained model has no idea what it is; fine-tuning on a few dozen conversations where the
assistant introduces itself as nanochat, trained with this app, and is honest about its limits
gives it a consistent answer. They ship with the project (`data/identity.jsonl`, written for
it) and are read through CustomJSON, so a user can swap in their own file with `customjson`.
They are the same for both sources (they are ours, not a public dataset) and form a train
split only: validating on conversations the model was trained on would measure nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.tasks.base import check_split
from training.tasks.customjson import CustomJSON

IDENTITY_FILE = Path(__file__).parent / "data" / "identity.jsonl"


class Identity(CustomJSON):
    """The shipped identity conversations as a task named "Identity"."""

    def __init__(self, split: str = "train", **slicing: Any) -> None:
        check_split("Identity", split, ("train",))
        super().__init__(IDENTITY_FILE, name="Identity", **slicing)
