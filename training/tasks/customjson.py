"""Conversations from a JSONL file: the user's own fine-tuning data (and the identity set).

One conversation per line, either `{"messages": [...]}` or a bare list of messages, in the
chat format the tokenizer renders (roles alternating user/assistant from a user message, an
optional leading system message, assistant content a string or a list of parts). Blank lines
are skipped. The whole file is checked when the task is built, with the tokenizer's own rules,
so a bad line fails at once as "<path>:<line>: <problem>" instead of mid-way through a
training run. A file has no splits: asked for "train" or "test", it gives the whole file (a
separate file makes a validation set: `customjson:/path/val.jsonl`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.tokenizer import _checked_messages, _checked_part
from training.tasks.base import ListTask


def parse_conversation(record: Any) -> dict[str, Any]:
    """One decoded JSON line as a checked conversation; ValueError saying what is wrong."""
    if isinstance(record, list):
        record = {"messages": record}
    if not isinstance(record, dict) or "messages" not in record:
        raise ValueError(
            'expected {"messages": [...]} or a list of messages, '
            f"got {type(record).__name__}"
            + (f" with keys {sorted(record)}" if isinstance(record, dict) else "")  # fmt: skip
        )
    messages = _checked_messages(record)
    for index, message in messages:
        content = message["content"]
        if isinstance(content, list):
            if not content:
                raise ValueError(f"message {index} (assistant) has an empty list of parts")
            for part_index, part in enumerate(content):
                _checked_part(part, index, part_index)
    if messages[-1][1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (it is what the model learns)")
    return {"messages": record["messages"]}


def load_conversations(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every conversation of a JSONL file, checked; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: conversation file not found")
    conversations = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 text ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            try:
                conversations.append(parse_conversation(record))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


class CustomJSON(ListTask):
    """The conversations of one JSONL file (training only: there is no grader)."""

    eval_type = "generative"

    def __init__(self, path: str | os.PathLike[str], name: str | None = None, **slicing: Any):
        super().__init__(**slicing)
        self.path = Path(path)
        self.name = name or f"CustomJSON({self.path.name})"
        self._data = load_conversations(self.path)
