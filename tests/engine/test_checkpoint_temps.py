"""Temp files of interrupted checkpoint writes do not stay forever (issue 13, item 9).

A writer killed between creating its hidden `.<name>.<random>.tmp` and renaming it leaves the
file behind; the next save to or load from that directory removes it, but never the temp file
of a write still in progress in another process (it is newer than this process).
"""

import os
import time

import torch

from engine import fileio
from engine.checkpoint import load_checkpoint, save_checkpoint, tokenizer_dir
from engine.models.gpt import GPTConfig

CONFIG = GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)


def _leftover(directory, name, age_s):
    path = directory / f".{name}.abc123.tmp"
    path.write_bytes(b"half a file")
    when = fileio._STARTED - age_s
    os.utime(path, (when, when))
    return path


def _state():
    return {"w": torch.zeros(2)}


def test_a_load_removes_stale_temps_and_keeps_live_ones(tmp_path):
    save_checkpoint(tmp_path, 5, model_state=_state(), model_config=CONFIG)
    tokenizer_dir(tmp_path).mkdir()
    stale = _leftover(tmp_path, "model_000010.pt", age_s=60)
    stale_tok = _leftover(tokenizer_dir(tmp_path), "tokenizer.pkl", age_s=60)
    live = tmp_path / ".optim_000010_rank1.pt.def456.tmp"
    live.write_bytes(b"being written")  # by a process that started after us
    os.utime(live, (time.time(), time.time()))

    model_state, _, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 5 and torch.equal(model_state["w"], torch.zeros(2))
    assert not stale.exists() and not stale_tok.exists()
    assert live.exists()


def test_a_save_after_a_crash_removes_the_crashed_writes_temps(tmp_path):
    stale = _leftover(tmp_path, "meta_000020.json", age_s=3600)
    save_checkpoint(tmp_path, 20, model_state=_state(), model_config=CONFIG)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_000020.json", "model_000020.pt"]


def test_other_files_are_never_touched(tmp_path):
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "model_000001.pt"]
    for path in keep:
        path.write_bytes(b"x")
        os.utime(path, (0, 0))
    assert fileio.remove_stale_temps(tmp_path) == []
    assert all(p.exists() for p in keep)
    assert fileio.remove_stale_temps(tmp_path / "missing") == []
