"""The event file: the only contract between the training programs and the web app.

A program given `--run-dir` appends one JSON object per line to `<run-dir>/events.jsonl`, each
with `type` and `time` (Unix seconds). Rank 0 writes; every line is flushed as it is written so
a reader following the file sees progress live. Readers ignore types they do not know, so new
event types never break an older web app.

Types and their fields:
  start        config, total_steps, world_size, device (+ anything else useful: program, ...)
  metrics      step, values {"train/loss": ..., "train/lr": ..., "train/tok_per_sec": ...}
  eval         step, values {"val/bpb": ..., "core": ...}
  sample       step, prompt, completion
  checkpoint   step, path, meta
  eval_result  task, metric, value, details
  report       section, markdown
  end          status ("succeeded" | "failed" | "cancelled"), error
  dataset      path, source, shards, documents, characters, bytes_on_disk, val_* (dataset built)
  tokenizer    path, vocab_size, documents, characters, seconds (tokenizer trained)
  stage        index, name, kind, run_dir, inputs, outputs, status ("started" | "succeeded" |
               "failed" | "skipped" | "cancelled"), error, seconds (training.pipeline: one
               stage's program starts or ends; its own events are in <run_dir>/events.jsonl)

The same module reads the file (`read_events`), so both sides share one definition.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
KNOWN_TYPES = (
    "start",
    "metrics",
    "eval",
    "sample",
    "checkpoint",
    "eval_result",
    "report",
    "end",
    "dataset",
    "tokenizer",
    "stage",
)


def _plain(value: Any) -> Any:
    """Make numbers from torch/numpy JSON-friendly; non-finite floats become None.

    A diverged loss (NaN/inf) is worth recording, but NaN is not valid JSON and PostgreSQL's
    JSON columns reject it, so it is written as null.
    """
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class EventWriter:
    """Appends events to `<run_dir>/events.jsonl`; a no-op when run_dir is None or not rank 0."""

    def __init__(self, run_dir: str | os.PathLike | None, rank: int = 0):
        self.path: Path | None = None
        self._file = None
        if run_dir is not None and rank == 0:
            self.path = Path(run_dir) / EVENTS_FILE
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered append: each event reaches the file as one write.
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def emit(self, type: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"type": type, "time": time.time(), **_plain(fields)}
        self._file.write(json.dumps(record, allow_nan=False, default=str) + "\n")

    def start(self, config: Mapping, total_steps: int, world_size: int, device: str, **extra):
        self.emit(
            "start",
            config=config,
            total_steps=total_steps,
            world_size=world_size,
            device=device,
            **extra,
        )

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.emit("metrics", step=step, values=values)

    def eval(self, step: int, values: Mapping[str, float]) -> None:
        self.emit("eval", step=step, values=values)

    def sample(self, step: int, prompt: str, completion: str) -> None:
        self.emit("sample", step=step, prompt=prompt, completion=completion)

    def checkpoint(self, step: int, path: str | os.PathLike, meta: Mapping | None = None):
        self.emit("checkpoint", step=step, path=str(path), meta=meta or {})

    def eval_result(self, task: str, metric: str, value: float, details: Mapping | None = None):
        self.emit("eval_result", task=task, metric=metric, value=value, details=details or {})

    def report(self, section: str, markdown: str) -> None:
        self.emit("report", section=section, markdown=markdown)

    def end(self, status: str, error: str | None = None) -> None:
        self.emit("end", status=status, error=error)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ReadResult:
    events: list[dict]
    offset: int  # byte offset to resume reading from
    bad_lines: list[str]  # complete lines that were not valid events


def read_events(path: str | os.PathLike, offset: int = 0) -> ReadResult:
    """Read complete lines from byte `offset` on; a partial last line is left for next time.

    Following a file that a running program appends to means a read can catch half a line;
    stopping at the last newline and returning that offset makes the next call pick it up.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return ReadResult([], offset, [])
    end = chunk.rfind(b"\n") + 1
    events, bad = [], []
    for raw in chunk[:end].splitlines():
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad.append(raw.decode("utf-8", "replace"))
            continue
        if isinstance(event, dict) and isinstance(event.get("type"), str):
            events.append(event)
        else:
            bad.append(raw.decode("utf-8", "replace"))
    return ReadResult(events, offset + end, bad)
