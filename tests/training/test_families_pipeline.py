"""Every stage after base training, for the GPT-2 and hybrid families, on CPU.

A tiny random base checkpoint of each family (base training itself is
tests/training/test_families_train.py) goes through mid-training, SFT, RL and every
evaluation as a GPT does: each training stage saves a checkpoint of the same family, each
report section names the family, and the engine's chat CLI and benchmark take the result.
The SFT run is shared by the tests downstream of it (module fixture, once per family).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from engine import bench, chat_cli
from engine import checkpoint as ckpt
from engine.models import registry
from engine.tokenizer import Tokenizer
from tests.training.conftest import read_events
from training import base_eval, chat_eval, chat_rl, chat_sft, mid_train

pytestmark = pytest.mark.timeout(300)

# Both layer kinds of the hybrid at depth 2, chunks shorter than a row; GPT-2 with dropout on,
# so a stage that forgot eval mode would evaluate and sample with dropout.
FAMILY_FLAGS = {
    "gpt2": {"dropout": 0.1},
    "hybrid": {"layer_pattern": "LF", "num_experts": 4, "experts_per_token": 2,
               "delta_chunk_size": 16},
}  # fmt: skip
# The optimizer recipe each family is trained with: GPT-2's own (AdamW), the hybrid's Muon.
RECIPE = {"gpt2": ["--optimizer", "adamw", "--adamw-lr", "3e-3"], "hybrid": []}
SFT_MIXTURE = "spelling_bee,simple_spelling,identity"


def of_type(events, kind):
    return [e for e in events if e["type"] == kind]


def assert_succeeded(run_dir) -> list[dict]:
    events = read_events(run_dir)
    assert events[0]["type"] == "start" and events[-1]["type"] == "end"
    assert events[-1]["status"] == "succeeded", events[-1]
    return events


def assert_family(directory, family: str, stage: str):
    model, meta = ckpt.load_model(directory)
    assert meta["model_config"]["model"] == family and model.config.model == family
    assert meta["stage"] == stage
    return model


@pytest.fixture(scope="module", params=sorted(FAMILY_FLAGS))
def base(request, tiny_corpus, tmp_path_factory):
    """(family, root, base checkpoint dir): a random tiny base model of the family."""
    family = request.param
    root = tmp_path_factory.mktemp(f"pipeline-{family}")
    tokenizer = Tokenizer.load(tiny_corpus[1])
    flags = {"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64,
             **FAMILY_FLAGS[family]}  # fmt: skip
    config = registry.family(family).config_from_flags(flags, tokenizer.vocab_size)
    torch.manual_seed(0)
    model = registry.build_model(config)
    directory = root / "base_checkpoints" / "d2"
    ckpt.save_checkpoint(directory, 0, model_state=model.state_dict(), model_config=config,
                         meta={"val_bpb": None})  # fmt: skip
    tokenizer.save(ckpt.tokenizer_dir(directory))
    return SimpleNamespace(family=family, root=root, dir=directory)


def sft_args(base, out, *extra) -> list[str]:
    return ["--config", "tiny", "--source-dir", str(base.dir), "--mixture", SFT_MIXTURE,
            "--num-iterations", "8", "--eval-every", "4", "--checkpoint-dir", str(out / "ckpt"),
            "--run-dir", str(out / "run"), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def sft(base):
    """chat_sft (tiny preset, 8 steps, the family's recipe) from the base checkpoint."""
    out = base.root / "sft"
    args = sft_args(base, out, *RECIPE[base.family], "--report-dir", str(out / "report"))
    assert chat_sft.main(args) == 0
    return SimpleNamespace(family=base.family, base=base, out=out, dir=out / "ckpt")


def test_sft_trains_and_saves_a_checkpoint_of_the_family(sft):
    events = assert_succeeded(sft.out / "run")
    start = events[0]
    assert start["derived"]["model_config"]["model"] == sft.family
    assert set(start["derived"]["parameters"]) == {*registry.family(sft.family).count_params(
        registry.config_from_dict(start["derived"]["model_config"]))}  # fmt: skip
    metrics = of_type(events, "metrics")
    assert [e["step"] for e in metrics] == list(range(1, 9))
    assert all(math.isfinite(e["values"]["train/loss"]) for e in metrics)
    # Whichever the recipe, its LRs are the base ones times init_lr_frac.
    frac, lrs = start["config"]["init_lr_frac"], start["derived"]["learning_rates"]
    recipe_lr = "adamw_lr" if "adamw" in RECIPE[sft.family] else "matrix_lr"
    assert lrs[recipe_lr] == pytest.approx(start["config"][recipe_lr] * frac)
    assert metrics[0]["values"]["train/lr"] == pytest.approx(lrs[recipe_lr])
    if sft.family == "hybrid":  # the family's own training metrics are logged, as in base
        assert all(e["values"]["moe/load_max"] >= 1.0 for e in metrics)
    evals = of_type(events, "eval")
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert evals[-1]["values"]["val/bpb"] < evals[0]["values"]["val/bpb"]
    model = assert_family(sft.dir, sft.family, "sft")
    base_model, _ = ckpt.load_model(sft.base.dir)
    changed = [not torch.equal(a, b) for a, b in
               zip(model.state_dict().values(), base_model.state_dict().values(), strict=True)]  # fmt: skip
    assert all(changed)  # every parameter group is trained
    label = registry.family(sft.family).label
    report = (sft.out / "report" / "chat_sft.md").read_text()
    assert f"- model: {label} (2 layers" in report and "- parameters: " in report


@pytest.mark.parametrize("base", ["gpt2"], indirect=True)  # the family with a tied head
def test_gpt2_learns_with_the_default_muon_recipe_too(base):
    out = base.root / "sft-muon"
    assert chat_sft.main(sft_args(base, out)) == 0
    evals = of_type(read_events(out / "run"), "eval")
    assert evals[-1]["values"]["val/bpb"] < evals[0]["values"]["val/bpb"]


def test_mid_train_trains_every_token_and_saves_a_checkpoint_of_the_family(base):
    out = base.root / "mid"
    args = ["--config", "tiny", "--source-dir", str(base.dir), "--num-iterations", "3",
            "--eval-every", "-1", "--checkpoint-dir", str(out / "ckpt"),
            "--run-dir", str(out / "run"), "--report-dir", str(out / "report")]  # fmt: skip
    assert mid_train.main(args) == 0
    events = assert_succeeded(out / "run")
    metrics = of_type(events, "metrics")
    assert [e["values"]["train/trained_tokens"] for e in metrics] == [4 * 64] * 3
    assert_family(out / "ckpt", base.family, "mid")
    label = registry.family(base.family).label
    assert f"- model: {label}" in (out / "report" / "mid_train.md").read_text()


def test_base_eval_gives_bpb_core_and_samples(base, tiny_corpus):
    out = base.root / "base_eval"
    args = ["--config", "tiny", "--checkpoint-dir", str(base.dir), "--data-dir",
            str(tiny_corpus[0]), "--max-per-task", "2", "--eval-tokens", "512",
            "--run-dir", str(out / "run"), "--report-dir", str(out / "report")]  # fmt: skip
    assert base_eval.main(args) == 0
    events = assert_succeeded(out / "run")
    (final,) = of_type(events, "eval")
    assert -1 <= final["values"]["core"] <= 1
    assert final["values"]["val/bpb"] > 0 and final["values"]["train/bpb"] > 0
    assert len(of_type(events, "sample")) > 0
    label = registry.family(base.family).label
    assert f"- model: {label}" in (out / "report" / "base_eval.md").read_text()


def test_chat_eval_generates_and_scores_choices(sft):
    out = sft.out / "chat_eval"
    args = ["--config", "tiny", "--checkpoint-dir", str(sft.dir), "--tasks",
            "spelling_bee,arc_easy", "--max-problems", "2", "--max-new-tokens", "8",
            "--run-dir", str(out / "run"), "--report-dir", str(out / "report")]  # fmt: skip
    assert chat_eval.main(args) == 0
    events = assert_succeeded(out / "run")
    results = {e["task"]: e for e in of_type(events, "eval_result") if e["metric"] == "accuracy"}
    assert set(results) == {"spelling_bee", "arc_easy"}
    assert all(0 <= r["value"] <= 1 for r in results.values())
    assert of_type(events, "sample")  # generated replies
    label = registry.family(sft.family).label
    assert f"- model: {label}" in (out / "report" / "chat_eval_sft.md").read_text()


def test_chat_rl_runs_two_steps_and_saves_a_checkpoint_of_the_family(sft):
    out = sft.out / "rl"
    args = ["--config", "tiny", "--source-dir", str(sft.dir), "--num-iterations", "2",
            "--max-new-tokens", "8", "--temperature", "1.5", "--eval-examples", "2",
            *RECIPE[sft.family],
            "--checkpoint-dir", str(out / "ckpt"), "--run-dir", str(out / "run"),
            "--report-dir", str(out / "report")]  # fmt: skip
    assert chat_rl.main(args) == 0
    events = assert_succeeded(out / "run")
    metrics = of_type(events, "metrics")
    assert [e["step"] for e in metrics] == [1, 2]
    assert all(math.isfinite(e["values"]["train/loss"]) for e in metrics)
    assert all(e["values"]["train/seq_len"] > 0 for e in metrics)
    (evaluation,) = of_type(events, "eval")
    assert 0 <= evaluation["values"]["pass@1"] <= evaluation["values"]["pass@k"] <= 1
    assert_family(out / "ckpt", sft.family, "rl")
    label = registry.family(sft.family).label
    assert f"- model: {label}" in (out / "report" / "chat_rl.md").read_text()


def test_chat_cli_and_bench_take_the_family(sft, capsys):
    assert chat_cli.main(["--checkpoint", str(sft.dir), "-p", "Hello!", "--max-tokens", "6",
                          "--seed", "1", "--device", "cpu"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()
    label = registry.family(sft.family).label
    common = ["--prompt-len", "8", "--gen", "4", "--samples", "2", "--repeats", "1",
              "--threads", "1", "--device", "cpu"]  # fmt: skip
    assert bench.main(["--checkpoint", str(sft.dir), *common]) == 0
    assert capsys.readouterr().out.startswith(f"model: {label}, 2 layers")
    random = ["--model", sft.family, "--depth", "2", "--head-dim", "32", "--n-embd", "64",
              "--vocab", "300", "--sequence-len", "32"]  # fmt: skip
    assert bench.main([*random, *common]) == 0
    assert capsys.readouterr().out.startswith(f"model: {label}, 2 layers, n_embd 64")
