"""Train the BPE tokenizer on a dataset's train shards and save it.

`python -m training.tok_train --data-dir DIR --out DIR [--vocab-size 32768] [--max-chars 2e9]`

The validation shard is never read, so tokenizer evaluation on it measures text the tokenizer
has not seen. Documents are capped at `--doc-cap` characters (a few huge documents would
otherwise dominate the pair counts) and reading stops after `--max-chars` characters: 2e9 is
nanochat's default, about 8 FineWeb-edu shards, far more than a 32K vocabulary needs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.paths import data_home
from engine.tokenizer import TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer
from training import dataset
from training.events import EventWriter
from training.flags import MAX_TOKENS, MAX_VOCAB, Flag, FlagSet
from training.program import cancel_on_sigterm, run_program

FLAGS = FlagSet(
    "tok_train",
    [
        Flag(
            "data_dir", str, None, "dataset directory (default: <data home>/base_data)", path=True
        ),
        Flag("out", str, None, "tokenizer directory (default: <data home>/tokenizer)", path=True),
        Flag(
            "vocab_size",
            int,
            32768,
            "vocabulary size incl. 9 special tokens",
            min=265,
            max=MAX_VOCAB,
        ),
        Flag(
            "max_chars",
            int,
            2_000_000_000,
            "characters of training text to read",
            min=1,
            max=MAX_TOKENS,
        ),
        Flag("doc_cap", int, 10_000, "characters kept from each document", min=1, max=MAX_TOKENS),
        Flag("run_dir", str, None, "write events.jsonl here", path=True),
    ],
    "Train the BPE tokenizer on the train shards.",
)


class _Counted:
    """Wraps the document stream to count what the trainer actually pulled from it."""

    def __init__(self, texts: Iterable[str], doc_cap: int) -> None:
        self._texts = texts
        self._doc_cap = doc_cap
        self.documents = 0
        self.characters = 0  # after the per-document cap

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.documents += 1
            self.characters += min(len(text), self._doc_cap)
            yield text


def train_tokenizer(
    data_dir: str | Path, vocab_size: int, max_chars: int, doc_cap: int
) -> tuple[Tokenizer, dict[str, Any]]:
    """Train on the train split; returns the tokenizer and what went into it."""
    texts = _Counted(dataset.iter_texts(data_dir, "train"), doc_cap)
    started = time.time()
    tokenizer = Tokenizer.train(texts, vocab_size=vocab_size, doc_cap=doc_cap, max_chars=max_chars)
    info = {
        "seconds": time.time() - started,
        "documents": texts.documents,
        # The trainer stops inside the document that crosses max_chars.
        "characters": min(texts.characters, max_chars),
    }
    return tokenizer, info


def token_bytes_stats(tokenizer: Tokenizer) -> dict[str, float]:
    """Byte lengths of the ordinary (non-special) tokens: how long a typical token is."""
    lengths = tokenizer.token_bytes()
    ordinary = lengths[lengths > 0].to(torch.float32)
    return {
        "special_tokens": int((lengths == 0).sum()),
        "min": float(ordinary.min()),
        "max": float(ordinary.max()),
        "mean": float(ordinary.mean()),
        "std": float(ordinary.std()),
    }


def report_markdown(config: dict[str, Any], info: dict[str, Any], stats: dict[str, float]) -> str:
    return "\n".join(
        [
            "## Tokenizer training",
            f"timestamp: {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            f"- data dir: {config['data_dir']}",
            f"- vocab size: {config['vocab_size']:,}",
            f"- max chars: {config['max_chars']:,}",
            f"- doc cap: {config['doc_cap']:,}",
            f"- documents used: {info['documents']:,}",
            f"- characters used: {info['characters']:,}",
            f"- training time: {info['seconds']:.2f}s",
            f"- special tokens: {stats['special_tokens']}",
            f"- token bytes min: {stats['min']:.0f}",
            f"- token bytes max: {stats['max']:.0f}",
            f"- token bytes mean: {stats['mean']:.3f}",
            f"- token bytes std: {stats['std']:.3f}",
        ]
    )


def run(config: dict[str, Any], events: EventWriter) -> None:
    out = Path(config["out"])
    print(
        f"training a {config['vocab_size']:,}-token tokenizer on {config['data_dir']} "
        f"(up to {config['max_chars']:,} chars, {config['doc_cap']:,} per document)",
        flush=True,
    )
    tokenizer, info = train_tokenizer(
        config["data_dir"], config["vocab_size"], config["max_chars"], config["doc_cap"]
    )
    print(
        f"trained in {info['seconds']:.2f}s on {info['documents']:,} documents, "
        f"{info['characters']:,} characters"
    )
    tokenizer.save(out)
    print(f"saved {out / TOKENIZER_FILE} and {out / TOKEN_BYTES_FILE}")
    stats = token_bytes_stats(tokenizer)
    print(
        f"token bytes (ordinary tokens): min {stats['min']:.0f}, max {stats['max']:.0f}, "
        f"mean {stats['mean']:.3f}, std {stats['std']:.3f}"
    )
    events.emit("tokenizer", path=str(out), vocab_size=tokenizer.vocab_size, **info)
    events.report("Tokenizer training", report_markdown(config, info, stats))


def main(argv: Sequence[str] | None = None) -> int:
    config = FLAGS.parse(argv)
    config["data_dir"] = str(config["data_dir"] or data_home() / "base_data")
    config["out"] = str(config["out"] or data_home() / "tokenizer")
    with EventWriter(config["run_dir"]) as events:
        events.start(config, total_steps=0, world_size=1, device="cpu", program="tok_train")
        return run_program(events, lambda: run(config, events))


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
