"""Base pretraining end to end on CPU: events, checkpoints, exact resume and DDP equivalence."""

import shutil
import subprocess
import sys

import pytest

from engine import checkpoint as ckpt
from tests.training.conftest import read_events, write_shards
from training import base_train

pytestmark = pytest.mark.timeout(300)


def run_args(data_dir, tokenizer_dir, out, *extra):
    return [
        "--config", "tiny",
        "--data-dir", str(data_dir),
        "--tokenizer-dir", str(tokenizer_dir),
        "--checkpoint-dir", str(out / "ckpt"),
        "--run-dir", str(out / "run"),
        *extra,
    ]  # fmt: skip


def test_tiny_run_writes_every_event_and_a_loadable_checkpoint(tiny_corpus, tmp_path):
    data_dir, tokenizer_dir = tiny_corpus
    assert base_train.main(run_args(data_dir, tokenizer_dir, tmp_path)) == 0
    events = read_events(tmp_path / "run")
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "end"
    assert events[-1]["status"] == "succeeded"
    assert [e["step"] for e in events if e["type"] == "metrics"] == list(range(1, 21))
    assert [e["step"] for e in events if e["type"] == "eval"] == [0, 10, 20]
    assert {e["step"] for e in events if e["type"] == "sample"} == {0, 20}
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [20]
    assert "report" in types
    first, last = (next(e for e in events if e["type"] == "metrics"),
                   [e for e in events if e["type"] == "metrics"][-1])  # fmt: skip
    assert last["values"]["train/loss"] < first["values"]["train/loss"]
    model, meta = ckpt.load_model(tmp_path / "ckpt")
    assert meta["step"] == 20 and meta["val_bpb"] > 0
    assert ckpt.load_tokenizer_for(tmp_path / "ckpt").vocab_size == 512


def final_metrics(run_dir):
    metrics = [e for e in read_events(run_dir) if e["type"] == "metrics"]
    return metrics[-1]


def test_resume_continues_exactly(tiny_corpus, tmp_path):
    data_dir, tokenizer_dir = tiny_corpus
    straight = tmp_path / "straight"
    assert base_train.main(run_args(data_dir, tokenizer_dir, straight, "--save-every", "10")) == 0
    assert ckpt.list_steps(straight / "ckpt") == [10, 20]
    resumed = tmp_path / "resumed"
    (resumed / "ckpt").mkdir(parents=True)
    for path in (straight / "ckpt").iterdir():
        if "000010" in path.name or path.name == "tokenizer":
            (shutil.copytree if path.is_dir() else shutil.copy)(path, resumed / "ckpt" / path.name)
    args = run_args(data_dir, tokenizer_dir, resumed, "--save-every", "10",
                    "--resume-from-step", "10")  # fmt: skip
    assert base_train.main(args) == 0
    a, b = final_metrics(straight / "run"), final_metrics(resumed / "run")
    assert a["step"] == b["step"] == 20
    assert b["values"]["train/loss_raw"] == pytest.approx(a["values"]["train/loss_raw"], abs=1e-4)
    assert b["values"]["train/loss"] == pytest.approx(a["values"]["train/loss"], abs=1e-4)


def test_ddp_two_processes_match_one_process_with_double_accumulation(tmp_path):
    # Identical documents make every packed row identical, so both layouts see the same data
    # and only the distributed arithmetic (gradient averaging, sharded optimizer) differs.
    from engine.tokenizer import Tokenizer

    text = "The quick brown fox jumps over the lazy dog; the dog sleeps. " * 3
    tokenizer = Tokenizer.train([text] * 50, vocab_size=300)
    tokenizer.save(tmp_path / "tok")
    data_dir = write_shards(tmp_path / "data", [text] * 600, per_shard=200)

    def run(name, nproc):
        out = tmp_path / name
        args = run_args(data_dir, tmp_path / "tok", out, "--num-iterations", "8",
                        "--eval-every", "-1", "--sample-every", "-1")  # fmt: skip
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "training.base_train"]  # fmt: skip
        done = subprocess.run(launcher + args, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return [e["values"]["train/loss_raw"] for e in read_events(out / "run")
                if e["type"] == "metrics"]  # fmt: skip

    one = run("one", 1)  # total batch 512 = 4 x 64 x 1 process x 2 accumulation steps
    two = run("two", 2)  # total batch 512 = 4 x 64 x 2 processes x 1 accumulation step
    assert len(one) == len(two) == 8
    assert two == pytest.approx(one, abs=1e-3)
