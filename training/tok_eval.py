"""How well a trained tokenizer compresses text, next to GPT-2's and GPT-4's encodings.

`python -m training.tok_eval --tokenizer DIR [--data-dir DIR] [--run-dir DIR]`

For each kind of text (news, Korean, code, math/LaTeX, science -- short samples written for
this project, in `training/corpus/tok_eval/` -- plus the start of a train shard and of the
validation shard) it counts UTF-8 bytes and tokens and reports bytes per token: more bytes per
token means shorter sequences, so more text fits in the same context and compute. The relative
difference is `(theirs - ours) / theirs` in tokens: positive means ours needs fewer tokens.

GPT-2 (`gpt2`) and GPT-4 (`cl100k_base`) ranks are downloaded by tiktoken on first use; when
they cannot be loaded (offline, nothing cached) their columns are left out with a note.
A small vocabulary trained on little text will lose to both; the Korean row shows what a
vocabulary that saw almost no Hangul does (nearly one token per byte).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.paths import data_home
from engine.tokenizer import Tokenizer
from training import dataset
from training.events import EventWriter
from training.flags import MAX_TOKENS, REPORT_DIR, Flag, FlagSet
from training.program import cancel_on_sigterm, run_program
from training.report import write_section

SAMPLES_DIR = Path(__file__).with_name("corpus") / "tok_eval"
SAMPLE_KINDS = ("news", "korean", "code", "math", "science")
# (column label, tiktoken encoding name)
BASELINES = (("GPT-2", "gpt2"), ("GPT-4", "cl100k_base"))

FLAGS = FlagSet(
    "tok_eval",
    [
        Flag(
            "tokenizer",
            str,
            None,
            "tokenizer directory (default: <data home>/tokenizer)",
            path=True,
        ),  # fmt: skip
        Flag(
            "data_dir",
            str,
            None,
            "dataset for the train/val rows (default: <data home>/base_data when it exists)",
            path=True,
        ),  # fmt: skip
        Flag(
            "shard_chars",
            int,
            10_000,
            "characters taken from each shard sample",
            min=1,
            max=MAX_TOKENS,
        ),
        Flag("run_dir", str, None, "write events.jsonl here", path=True),
        REPORT_DIR,
    ],
    "Compare the tokenizer's compression with GPT-2 and GPT-4 encodings.",
)


@dataclass(frozen=True)
class Row:
    kind: str
    bytes: int
    tokens: int  # ours
    # baseline label -> token count, for the baselines that could be loaded
    baseline_tokens: dict[str, int]

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    def relative_diff(self, label: str) -> float:
        """Percent fewer tokens than the baseline (negative: ours needs more)."""
        theirs = self.baseline_tokens[label]
        return 100.0 * (theirs - self.tokens) / theirs if theirs else 0.0


def sample_texts() -> dict[str, str]:
    """The shipped samples, one per kind."""
    return {
        kind: (SAMPLES_DIR / f"{kind}.txt").read_text(encoding="utf-8") for kind in SAMPLE_KINDS
    }


def shard_sample(data_dir: str | Path, split: str, max_chars: int) -> str:
    """Whole documents from the start of a split, joined, until `max_chars` is reached."""
    parts: list[str] = []
    total = 0
    for text in dataset.iter_texts(data_dir, split):
        parts.append(text[: max_chars - total])
        total += len(parts[-1])
        if total >= max_chars:
            break
    if not parts:
        raise ValueError(f"the {split} split of {data_dir} has no documents")
    return "\n".join(parts)


def load_baselines(labels: Sequence[tuple[str, str]] = BASELINES) -> tuple[dict, list[str]]:
    """({label: Tokenizer}, notes about those that could not be loaded)."""
    loaded, notes = {}, []
    for label, name in labels:
        try:
            loaded[label] = Tokenizer.from_pretrained_tiktoken(name)
        except OSError:
            notes.append(
                f"{label} columns skipped: the {name!r} encoding could not be loaded (offline "
                f"and not in tiktoken's cache; TIKTOKEN_CACHE_DIR can point to a copy)"
            )
    return loaded, notes


def evaluate(
    tokenizer: Tokenizer, texts: Mapping[str, str], baselines: Mapping[str, Tokenizer]
) -> list[Row]:
    """One row per text; raises ValueError if our tokenizer does not round-trip a text."""
    rows = []
    for kind, text in texts.items():
        ids = tokenizer.encode(text)
        if tokenizer.decode(ids) != text:
            raise ValueError(f"the tokenizer does not decode the {kind!r} sample back to itself")
        counts = {label: len(base.encode(text)) for label, base in baselines.items()}
        rows.append(Row(kind, len(text.encode("utf-8")), len(ids), counts))
    return rows


def markdown_table(rows: Sequence[Row], labels: Sequence[str]) -> str:
    header = ["Text", "Bytes", "Ours tokens", "Ours B/tok"]
    for label in labels:
        header += [f"{label} tokens", f"{label} B/tok", f"vs {label}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.kind, f"{row.bytes:,}", f"{row.tokens:,}", f"{row.bytes_per_token:.2f}"]
        for label in labels:
            theirs = row.baseline_tokens[label]
            cells += [
                f"{theirs:,}",
                f"{row.bytes / theirs:.2f}" if theirs else "-",
                f"{row.relative_diff(label):+.1f}%",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_values(rows: Sequence[Row]) -> dict[str, float]:
    """Flat numbers for the `eval` event: `tok/bytes_per_token/<kind>`, `tok/vs_<label>/<kind>`."""
    values = {}
    for row in rows:
        values[f"tok/bytes_per_token/{row.kind}"] = row.bytes_per_token
        for label in row.baseline_tokens:
            key = label.lower().replace("-", "")
            values[f"tok/vs_{key}/{row.kind}"] = row.relative_diff(label)
    return values


def _data_dir(configured: str | None) -> Path | None:
    if configured:
        return Path(configured)
    default = data_home() / "base_data"
    return default if default.is_dir() else None


def run(config: dict[str, Any], events: EventWriter) -> list[Row]:
    tokenizer_dir = Path(config["tokenizer"] or data_home() / "tokenizer")
    tokenizer = Tokenizer.load(tokenizer_dir)
    print(f"tokenizer: {tokenizer_dir} ({tokenizer.vocab_size:,} tokens)")
    texts = sample_texts()
    notes = []
    data_dir = _data_dir(config["data_dir"])
    if data_dir is None:
        notes.append("train/val rows skipped: no --data-dir given and no default dataset")
    else:
        texts["train"] = shard_sample(data_dir, "train", config["shard_chars"])
        texts["val"] = shard_sample(data_dir, "val", config["shard_chars"])
    baselines, baseline_notes = load_baselines()
    notes += baseline_notes
    for note in notes:
        print(f"note: {note}")
    rows = evaluate(tokenizer, texts, baselines)
    table = markdown_table(rows, list(baselines))
    print(table)
    markdown = "\n".join(
        [
            "## Tokenizer evaluation",
            f"timestamp: {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            f"- tokenizer: {tokenizer_dir}",
            f"- vocab size: {tokenizer.vocab_size:,}",
            f"- data dir: {data_dir or '-'}",
            *(f"- note: {note}" for note in notes),
            "",
            "Bytes per token (higher is better); `vs X` = how many fewer tokens than X.",
            "",
            table,
        ]
    )
    events.eval(0, eval_values(rows))
    events.report("Tokenizer evaluation", markdown)
    write_section(config["report_dir"], "tok_eval", markdown)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    config = FLAGS.parse(argv)
    with EventWriter(config["run_dir"]) as events:
        events.start(config, total_steps=0, world_size=1, device="cpu", program="tok_eval")
        return run_program(events, lambda: run(config, events))


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
