"""base_eval end to end on a tiny random checkpoint: events, report section, errors, DDP."""

import json
import subprocess
import sys

import pytest
import torch

from engine import checkpoint as ckpt
from engine.models.gpt import GPT, GPTConfig
from engine.tokenizer import Tokenizer
from tests.training.conftest import read_events
from training import base_eval
from training.base_train import SAMPLE_PROMPTS
from training.core_eval import SHIPPED_BUNDLE, load_bundle

pytestmark = pytest.mark.timeout(300)
STEP = 5


def save_random_checkpoint(directory, tokenizer_dir, vocab_size=None):
    tokenizer = Tokenizer.load(tokenizer_dir)
    config = GPTConfig(sequence_len=64, vocab_size=vocab_size or tokenizer.vocab_size, n_layer=1,
                       n_head=1, n_kv_head=1, n_embd=32, window_pattern="L")  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    ckpt.save_checkpoint(directory, STEP, model_state=model.state_dict(), model_config=config,
                         meta={"val_bpb": None})  # fmt: skip
    tokenizer.save(ckpt.tokenizer_dir(directory))
    return directory


@pytest.fixture(scope="module")
def checkpoint(tiny_corpus, tmp_path_factory):
    _, tokenizer_dir = tiny_corpus
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "d1", tokenizer_dir)


@pytest.fixture(autouse=True)
def empty_home(tmp_path, monkeypatch):
    # No default dataset or bundle from the machine's real data home.
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))


def test_tiny_eval_writes_events_and_a_report_section(checkpoint, tiny_corpus, tmp_path):
    data_dir, _ = tiny_corpus
    run_dir, report_dir = tmp_path / "run", tmp_path / "report"
    code = base_eval.main(["--config", "tiny", "--checkpoint-dir", str(checkpoint),
                           "--data-dir", str(data_dir), "--run-dir", str(run_dir),
                           "--report-dir", str(report_dir)])  # fmt: skip
    assert code == 0
    events = read_events(run_dir)
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "end" and events[-1]["status"] == "succeeded"
    assert events[0]["step"] == STEP and events[0]["program"] == "base_eval"

    labels = [t.label for t in load_bundle(SHIPPED_BUNDLE)]
    results = [e for e in events if e["type"] == "eval_result"]
    assert [e["task"] for e in results] == labels
    for result in results:
        assert result["metric"] == "centered"
        assert result["data_source"] == "offline"  # the shipped bundle, not DCLM's
        details = result["details"]
        assert details["n"] == 8  # the tiny preset's max_per_task
        assert result["value"] == pytest.approx(
            (details["accuracy"] - details["baseline"]) / (1 - details["baseline"])
        )
    (evaluation,) = [e for e in events if e["type"] == "eval"]
    assert evaluation["step"] == STEP and evaluation["data_source"] == "offline"
    values = evaluation["values"]
    assert values["core"] == pytest.approx(sum(r["value"] for r in results) / len(results))
    # A random model over a 512-token vocabulary: about log2(512)/bytes-per-token bits.
    assert 0.5 < values["train/bpb"] < 10 and 0.5 < values["val/bpb"] < 10

    samples = [e for e in events if e["type"] == "sample"]
    assert [s["prompt"] for s in samples] == list(SAMPLE_PROMPTS)
    assert all(s["step"] == STEP for s in samples)

    (report,) = [e for e in events if e["type"] == "report"]
    assert report["section"] == "Base model evaluation"
    assert "| Task | Type |" in report["markdown"]
    section = (report_dir / "base_eval.md").read_text()
    assert section.startswith("## Base model evaluation")
    assert f"- CORE: {values['core']:.4f}" in section
    summary = json.loads((report_dir / "base_eval.json").read_text())
    assert summary["column"] == "BASE"
    assert summary["summary"]["CORE"] == pytest.approx(values["core"])


def test_without_data_bpb_is_skipped_with_a_note(checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    code = base_eval.main(["--config", "tiny", "--checkpoint-dir", str(checkpoint),
                           "--step", str(STEP), "--sample-tokens", "0", "--max-per-task", "3",
                           "--run-dir", str(run_dir)])  # fmt: skip
    assert code == 0
    events = read_events(run_dir)
    (evaluation,) = [e for e in events if e["type"] == "eval"]
    assert set(evaluation["values"]) == {"core"}
    assert not [e for e in events if e["type"] == "sample"]
    assert all(e["details"]["n"] == 3 for e in events if e["type"] == "eval_result")
    (report,) = [e for e in events if e["type"] == "report"]
    assert "bpb skipped" in report["markdown"]
    assert not (tmp_path / "report").exists()  # no --report-dir, no section file


def run_failing(args, tmp_path, capsys):
    code = base_eval.main([*args, "--config", "tiny", "--run-dir", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert read_events(tmp_path / "run")[-1]["status"] == "failed"
    return err[0]


def test_checkpoint_dir_is_required(tmp_path, capsys):
    assert "checkpoint_dir: required" in run_failing([], tmp_path, capsys)


def test_missing_checkpoint_or_step(checkpoint, tmp_path, capsys):
    line = run_failing(["--checkpoint-dir", str(tmp_path / "nope")], tmp_path, capsys)
    assert "checkpoint_dir" in line and "nope" in line
    line = run_failing(["--checkpoint-dir", str(checkpoint), "--step", "7"], tmp_path, capsys)
    assert "step 7" in line


def test_vocab_mismatch_names_the_checkpoint(tiny_corpus, tmp_path, capsys):
    _, tokenizer_dir = tiny_corpus
    directory = save_random_checkpoint(tmp_path / "bad", tokenizer_dir, vocab_size=520)
    line = run_failing(["--checkpoint-dir", str(directory)], tmp_path, capsys)
    assert str(directory) in line and "520" in line and "512" in line


def test_bad_bundle_is_one_clear_line(checkpoint, tmp_path, capsys):
    (tmp_path / "bundle").mkdir()
    line = run_failing(["--checkpoint-dir", str(checkpoint), "--bundle-dir",
                        str(tmp_path / "bundle")], tmp_path, capsys)  # fmt: skip
    assert "core.yaml is missing" in line


def test_missing_data_dir_is_an_error(checkpoint, tmp_path, capsys):
    line = run_failing(["--checkpoint-dir", str(checkpoint), "--data-dir",
                        str(tmp_path / "nodata")], tmp_path, capsys)  # fmt: skip
    assert line.startswith("error: data_dir:")


def test_presets_parse():
    assert set(base_eval.FLAGS.presets()) >= {"tiny", "demo-cpu"}
    for name in ("tiny", "demo-cpu"):
        base_eval.FLAGS.load_config_file(name)


def test_two_processes_give_the_same_core_as_one(checkpoint, tmp_path):
    args = ["--config", "tiny", "--checkpoint-dir", str(checkpoint), "--sample-tokens", "0"]
    assert base_eval.main([*args, "--run-dir", str(tmp_path / "one")]) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "training.base_eval"]  # fmt: skip
    done = subprocess.run([*launcher, *args, "--run-dir", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def scores(run):
        events = read_events(tmp_path / run)
        return [(e["task"], e["value"], e["details"]["n"]) for e in events
                if e["type"] == "eval_result"]  # fmt: skip

    assert scores("two") == scores("one")
