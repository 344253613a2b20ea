"""Small real inputs for training tests: parquet shards and a tokenizer trained on them."""

import importlib
import inspect
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.tokenizer import Tokenizer

STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "email.message", "functools", "http.client",
    "inspect", "itertools", "json", "logging", "os", "pathlib", "re", "string", "subprocess",
    "textwrap", "threading", "typing", "unittest", "urllib.parse",
)  # fmt: skip


def stdlib_documents(limit: int = 1200) -> list[str]:
    """Docstrings of a fixed set of stdlib modules and their members: real English + code."""
    docs = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) if callable(member) else None
            if doc and len(doc) > 80:
                docs.append(doc)
    return sorted(set(docs))[:limit]


def write_shards(directory, documents, per_shard: int):
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(documents), per_shard):
        table = pa.table({"text": documents[i : i + per_shard]})
        pq.write_table(table, directory / f"shard_{i // per_shard:05d}.parquet",
                       row_group_size=128, compression="zstd")  # fmt: skip
    return directory


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(data_dir, tokenizer_dir): 4 shards of stdlib docstrings and a 512-token tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    docs = stdlib_documents()
    data_dir = write_shards(root / "data", docs, per_shard=len(docs) // 4 + 1)
    tokenizer = Tokenizer.train(docs, vocab_size=512)
    tokenizer.save(root / "tokenizer")
    return data_dir, root / "tokenizer"


def read_events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
