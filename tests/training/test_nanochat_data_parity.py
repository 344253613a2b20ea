"""Our pretraining loader against karpathy's nanochat loader itself: identical rows.

`training.compare_reference` trains both projects on the same shards and tokenizer and compares
their validation bpb; that comparison means something only if both read the same rows. This
runs nanochat's `tokenizing_distributed_data_loader_bos_bestfit` (from a source checkout named
by NANOCHAT_SRC; skipped without one, as in CI) in a subprocess -- its data directory is fixed
at import from NANOCHAT_BASE_DIR -- on shards and a tokenizer written here, and checks that ours
yields exactly the same input and target tensors, for both splits, over several passes of the
data. Row groups of 300 documents make the tokenizer's 128-document chunks matter.

    NANOCHAT_SRC=/tmp/nanochat-src .venv/bin/python -m pytest -q \\
        tests/training/test_nanochat_data_parity.py
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.tokenizer import Tokenizer
from training.dataloader import pretrain_batches

SOURCE = os.environ.get("NANOCHAT_SRC", "")
B, T, BATCHES = 8, 64, 40

pytestmark = pytest.mark.skipif(
    not (SOURCE and (Path(SOURCE) / "nanochat" / "dataloader.py").is_file()),
    reason="set NANOCHAT_SRC to a nanochat source checkout (see the module docstring)",
)

DUMP = """
import sys, torch
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit as loader
from nanochat.tokenizer import get_tokenizer
B, T, n, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tok = get_tokenizer()
dump = {}
for split in ("train", "val"):
    batches = loader(tok, B, T, split=split, device="cpu")
    # Its yields are views of one reused buffer: copy each before asking for the next.
    rows = [tuple(t.clone() for t in next(batches)) for _ in range(n)]
    dump[split] = (torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows]))
torch.save(dump, out)
"""


def _texts(rng: random.Random, count: int) -> list[str]:
    words = [
        "river",
        "stone",
        "lantern",
        "harbor",
        "meadow",
        "copper",
        "seven",
        "quietly",
        "over",
        "the",
        "a",
        "of",
        "and",
    ]
    # Mostly short documents and some longer than a row, so rows mix whole and cropped ones.
    lengths = [
        rng.choice([rng.randint(1, 20)] * 5 + [rng.randint(20, 120)] * 2) for _ in range(count)
    ]
    return [f"d{rng.randrange(10**6)} " + " ".join(rng.choices(words, k=n)) for n in lengths]


def test_both_loaders_yield_identical_rows(tmp_path):
    rng = random.Random(7)
    shards = [_texts(rng, count) for count in (700, 450, 160)]  # the last one is validation
    data = tmp_path / "base_data_climbmix"
    data.mkdir()
    for index, texts in enumerate(shards):
        pq.write_table(
            pa.table({"text": texts}), data / f"shard_{index:05d}.parquet", row_group_size=300
        )
    tokenizer = Tokenizer.train([text for shard in shards for text in shard], vocab_size=300)
    tokenizer.save(tmp_path / "tokenizer")
    # Enough batches to go round the validation split more than once (a second epoch).
    val_tokens = sum(map(len, tokenizer.encode(shards[-1], prepend=tokenizer.get_bos_token_id())))
    assert val_tokens < BATCHES * B * (T + 1)

    out = tmp_path / "nanochat_rows.pt"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "PYTHONPATH": SOURCE}
    subprocess.run(
        [sys.executable, "-c", DUMP, str(B), str(T), str(BATCHES), str(out)],
        env=env, check=True, timeout=300,
    )  # fmt: skip
    theirs = torch.load(out)
    for split in ("train", "val"):
        ours = pretrain_batches(data, tokenizer, B, T, split=split)
        rows = [next(ours) for _ in range(BATCHES)]
        inputs, targets = torch.stack([x for x, _, _ in rows]), torch.stack([y for _, y, _ in rows])
        assert torch.equal(inputs[:, :, 0], torch.full((BATCHES, B), tokenizer.get_bos_token_id()))
        assert torch.equal(inputs, theirs[split][0]), split
        assert torch.equal(targets, theirs[split][1]), split
