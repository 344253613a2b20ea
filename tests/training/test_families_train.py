"""base_train trains every model family end to end on CPU: the GPT-2 recipe and the hybrid
learn, save loadable checkpoints of their family, resume exactly and give the same losses on
two processes as on one with accumulation (gloo)."""

import shutil
import subprocess
import sys

import pytest

from engine import checkpoint as ckpt
from tests.training.conftest import read_events, write_shards
from tests.training.test_base_train import final_metrics, run_args
from training import base_train

pytestmark = pytest.mark.timeout(300)

FAMILY_ARGS = {
    # The GPT-2 recipe: AdamW with decay on matrices only, warmup + cosine, clipping.
    "gpt2": ["--model", "gpt2", "--optimizer", "adamw", "--adamw-lr", "3e-3",
             "--lr-schedule", "cosine", "--warmup-steps", "3", "--final-lr-frac", "0.1",
             "--grad-clip", "1.0"],
    # Both layer kinds at depth 2; four experts, two per token; chunks shorter than a row.
    "hybrid": ["--model", "hybrid", "--layer-pattern", "LF", "--num-experts", "4",
               "--experts-per-token", "2", "--delta-chunk-size", "16"],
}  # fmt: skip


def metrics(run_dir):
    return [e for e in read_events(run_dir) if e["type"] == "metrics"]


@pytest.mark.parametrize("family", FAMILY_ARGS)
def test_a_tiny_run_learns_and_saves_its_family(tiny_corpus, tmp_path, family):
    data_dir, tokenizer_dir = tiny_corpus
    args = run_args(data_dir, tokenizer_dir, tmp_path, *FAMILY_ARGS[family], "--num-iterations",
                    "30", "--eval-every", "30")  # fmt: skip
    assert base_train.main(args) == 0
    steps = metrics(tmp_path / "run")
    assert len(steps) == 30
    first, last = steps[0]["values"], steps[-1]["values"]
    assert last["train/loss"] < first["train/loss"] - 0.5
    start = next(e for e in read_events(tmp_path / "run") if e["type"] == "start")
    assert start["derived"]["model"] == family
    model, meta = ckpt.load_model(tmp_path / "ckpt")
    assert meta["model_config"]["model"] == family and model.config.model == family
    if family == "gpt2":
        assert last["train/grad_norm"] > 0
    else:
        assert last["moe/load_max"] >= 1.0 and last["moe/aux_loss"] >= 1.0
        assert "moe/load_max/l0" in last


@pytest.mark.parametrize("family", FAMILY_ARGS)
def test_resume_continues_exactly(tiny_corpus, tmp_path, family):
    data_dir, tokenizer_dir = tiny_corpus
    straight = tmp_path / "straight"
    extra = [*FAMILY_ARGS[family], "--save-every", "10", "--eval-every", "-1"]
    assert base_train.main(run_args(data_dir, tokenizer_dir, straight, *extra)) == 0
    resumed = tmp_path / "resumed"
    (resumed / "ckpt").mkdir(parents=True)
    for path in (straight / "ckpt").iterdir():
        if "000010" in path.name or path.name == "tokenizer":
            (shutil.copytree if path.is_dir() else shutil.copy)(path, resumed / "ckpt" / path.name)
    args = run_args(data_dir, tokenizer_dir, resumed, *extra, "--resume-from-step", "10")
    assert base_train.main(args) == 0
    a, b = final_metrics(straight / "run"), final_metrics(resumed / "run")
    assert a["step"] == b["step"] == 20
    assert b["values"]["train/loss_raw"] == pytest.approx(a["values"]["train/loss_raw"], abs=1e-4)


@pytest.mark.parametrize("family", FAMILY_ARGS)
def test_two_processes_match_one_process_with_double_accumulation(tmp_path, family):
    from engine.tokenizer import Tokenizer

    text = "The quick brown fox jumps over the lazy dog; the dog sleeps. " * 3
    tokenizer = Tokenizer.train([text] * 50, vocab_size=300)
    tokenizer.save(tmp_path / "tok")
    data_dir = write_shards(tmp_path / "data", [text] * 600, per_shard=200)

    def run(name, nproc):
        out = tmp_path / name
        args = run_args(data_dir, tmp_path / "tok", out, *FAMILY_ARGS[family],
                        "--num-iterations", "6", "--eval-every", "-1", "--sample-every", "-1")  # fmt: skip
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "training.base_train"]  # fmt: skip
        done = subprocess.run(launcher + args, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return [e["values"]["train/loss_raw"] for e in metrics(out / "run")]

    one, two = run("one", 1), run("two", 2)
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, abs=1e-3)
