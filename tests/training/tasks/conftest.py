"""Fixtures for the task tests: a tokenizer, and a fake Hugging Face Hub on the local disk."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.tokenizer import Tokenizer
from training.tasks import hub


@pytest.fixture(scope="session")
def tokenizer(tiny_corpus):
    return Tokenizer.load(tiny_corpus[1])


class FakeHub:
    """A directory laid out like huggingface.co, served to urllib through file:// URLs."""

    def __init__(self, root):
        self.root = root

    def add_parquet(self, repo: str, path: str, rows: list[dict]) -> None:
        """Write `rows` as `<repo>/<path>` and list it in its folder's tree API answer."""
        target = self.root / "datasets" / repo / "resolve" / "main" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), target)
        folder = path.rsplit("/", 1)[0]
        listing_path = self.root / "api" / "datasets" / repo / "tree" / "main" / folder
        listing = json.loads(listing_path.read_text()) if listing_path.exists() else []
        listing.append({"type": "file", "path": path, "size": target.stat().st_size})
        listing_path.parent.mkdir(parents=True, exist_ok=True)
        listing_path.write_text(json.dumps(listing))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(hub, "HF_ENDPOINT", root.as_uri())
    monkeypatch.setattr(hub, "BACKOFF_S", 0.0)
    return FakeHub(root)
