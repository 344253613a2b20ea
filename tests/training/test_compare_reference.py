"""The side-by-side with nanochat: parsing both programs' output, the training clock, the
equal-time interpolation, the shared data layout, and (where a nanochat checkout is at hand) a
real comparison of a tiny shape for a few steps."""

import json
import os
from pathlib import Path

import pytest

from training import base_train
from training import compare_reference as cr

NANOCHAT_LOG = """\
COMPUTE_DTYPE: torch.float32 (auto-detected: no CUDA (CPU/MPS))
Step 00000 | Validation bpb: 3.741234
step 00000/00004 (0.00%) | loss: 6.238000 | lrm: 0.03 | dt: 30000.00ms | tok/sec: 8 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 0 | total time: 0.00m
step 00001/00004 (25.00%) | loss: 6.100000 | lrm: 0.05 | dt: 200.00ms | tok/sec: 1,280 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 0 | total time: 0.00m
Step 00002 | Validation bpb: 3.500000
step 00002/00004 (50.00%) | loss: 5.900000 | lrm: 0.08 | dt: 100.00ms | tok/sec: 2,560 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 1 | total time: 0.00m
step 00003/00004 (75.00%) | loss: 5.700000 | lrm: 0.10 | dt: 100.00ms | tok/sec: 2,560 | bf16_mfu: 0.00 | epoch: 1 pq: 0 rg: 1 | total time: 0.00m
Step 00004 | Validation bpb: 3.300000
Peak memory usage: 0.00MiB
"""  # noqa: E501


def test_nanochat_log_steps_are_counted_as_completed_steps():
    curve = cr.parse_nanochat_log(NANOCHAT_LOG)
    # "step 00000/..." is the first step taken: completed step 1, as our metrics count.
    assert curve.step_seconds == {1: 30.0, 2: 0.2, 3: 0.1, 4: 0.1}
    assert curve.train_loss[4] == 5.7
    assert curve.evals == [(0, 3.741234), (2, 3.5), (4, 3.3)]
    # The first step (compilation) is left out of the clock; evals at step <= skip sit at 0.
    assert curve.clock(skip=1) == {0: 0.0, 1: 0.0, 2: 0.2, 3: pytest.approx(0.3),
                                   4: pytest.approx(0.4)}  # fmt: skip
    assert curve.tok_per_sec(256, skip=1) == pytest.approx(2560)
    assert curve.timed_evals(skip=1) == [(0.0, 3.741234, 0), (0.2, 3.5, 2),
                                         (pytest.approx(0.4), 3.3, 4)]  # fmt: skip


def write_events(path: Path, events: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n{cut short")
    return path


def test_our_events_give_the_same_curve(tmp_path):
    events = write_events(tmp_path / "events.jsonl", [
        {"type": "start", "time": 0, "config": {}},
        {"type": "eval", "time": 1, "step": 0, "values": {"val/bpb": 3.74}},
        {"type": "metrics", "time": 2, "step": 1,
         "values": {"train/step_ms": 900.0, "train/loss": 6.2}},
        {"type": "metrics", "time": 3, "step": 2,
         "values": {"train/step_ms": 150.0, "train/loss": 6.0}},
        {"type": "eval", "time": 4, "step": 2, "values": {"val/bpb": 3.4}},
        {"type": "metrics", "time": 5, "step": "x", "values": {"train/step_ms": 1.0}},
    ])  # fmt: skip
    curve = cr.parse_our_events(events)
    assert curve.step_seconds == {1: 0.9, 2: 0.15}
    assert curve.evals == [(0, 3.74), (2, 3.4)]
    assert curve.clock(skip=0) == {0: 0.0, 1: 0.9, 2: pytest.approx(1.05)}


def test_interpolation_and_the_equal_time_grid():
    points = [(0.0, 4.0), (0.0, 3.8), (10.0, 2.8), (20.0, 2.3)]
    assert cr.interpolate(points, 0.0) == 3.8  # the last of equal times
    assert cr.interpolate(points, 5.0) == pytest.approx(3.3)
    assert cr.interpolate(points, 15.0) == pytest.approx(2.55)
    assert cr.interpolate(points, 20.0) == 2.3
    assert cr.interpolate(points, 20.5) is None and cr.interpolate([], 1.0) is None
    assert cr.equal_time_grid([40.0, 30.0], 3) == [10.0, 20.0, 30.0]
    assert cr.equal_time_grid([], 3) == [] and cr.equal_time_grid([5.0], 0) == []


def result(tool: str, curve: cr.Curve) -> cr.RunResult:
    return cr.RunResult(tool=tool, mode="defaults", repeat=0, load_before=(1.0, 1.0, 1.0),
                        returncode=0, wall_seconds=1.0, peak_rss_tree=2**30,
                        peak_rss_main=2**29, log_path="log", curve=curve)  # fmt: skip


def test_a_pair_is_compared_at_equal_steps_and_at_equal_training_time():
    # ours: 1 s per step; nanochat: 2 s per step. Equal steps compare like with like; equal
    # time gives the faster run credit for the steps it took meanwhile.
    ours = cr.Curve(step_seconds={s: 1.0 for s in range(1, 5)},
                    evals=[(0, 4.0), (2, 3.0), (4, 2.0)])  # fmt: skip
    theirs = cr.Curve(step_seconds={s: 2.0 for s in range(1, 5)},
                      evals=[(0, 4.0), (2, 2.8), (4, 1.8)])  # fmt: skip
    pair = cr.compare_pair(result("ours", ours), result("nanochat", theirs), skip=0,
                           time_points=2)  # fmt: skip
    assert pair["equal_steps"][1] == {"step": 2, "ours": 3.0, "nanochat": 2.8}
    # Common end: ours' last eval at 4 s; grid 2 s and 4 s.
    assert [row["seconds"] for row in pair["equal_time"]] == [2.0, 4.0]
    at4 = pair["equal_time"][1]
    assert at4["ours"] == 2.0 and at4["ours_step"] == 4
    assert at4["nanochat"] == pytest.approx(2.8) and at4["nanochat_step"] == 2


def test_hparams_and_the_nanochat_checkout_are_checked(tmp_path):
    assert cr.parse_hparams(["matrix_lr=0.03", "warmup-steps=10"]) == {
        **cr.EXPLICIT_HPARAMS, "matrix_lr": 0.03, "warmup_steps": 10}  # fmt: skip
    for bad in ("matrix_lr", "depth=3", "matrix_lr=abc", "matrix_lr=-1", "matrix_lr=nan"):
        with pytest.raises(ValueError, match="--hparam"):
            cr.parse_hparams([bad])
    with pytest.raises(ValueError, match="not a nanochat source tree"):
        cr.check_nanochat(tmp_path)


def test_the_shared_layout_is_what_nanochat_reads(tmp_path, tiny_corpus):
    data_dir, tokenizer_dir = tiny_corpus
    shared = cr.prepare_shared(tmp_path, data_dir, tokenizer_dir)
    shards = sorted(p.name for p in data_dir.glob("*.parquet"))
    home = tmp_path / "nanochat_home"
    linked = sorted(p.name for p in (home / cr.NANOCHAT_DATA).iterdir())
    assert linked == shards and shared["val_shard"] == shards[-1]
    assert all((home / cr.NANOCHAT_DATA / n).resolve() == (data_dir / n).resolve() for n in linked)
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        assert (home / "tokenizer" / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    with pytest.raises(ValueError, match="--data-dir"):
        cr.prepare_shared(tmp_path, tmp_path / "empty", tokenizer_dir)


def test_commands_pass_the_same_shape_and_explicit_hyperparameters_to_both(tmp_path):
    setup = cr.Setup(
        nanochat=tmp_path, work_dir=tmp_path, data_dir=tmp_path / "d", tokenizer_dir=tmp_path / "t",
        shape=dict(cr.SHAPE_DEFAULTS), steps=300, eval_every=50, eval_tokens=65536, dtype="fp32",
        hparams=dict(cr.EXPLICIT_HPARAMS), our_compile="auto", our_config="demo-cpu",
        threads=None, timeout=10.0, python="python",
    )  # fmt: skip

    def options(command):
        return {a: b for a, b in zip(command, command[1:], strict=False) if a.startswith("--")}

    ours = options(cr.our_command(setup, "explicit", tmp_path / "run"))
    theirs = options(cr.nanochat_command(setup, "explicit", "tag"))
    shared = [f"--{k.replace('_', '-')}" for k in [*cr.SHAPE_DEFAULTS, *cr.EXPLICIT_HPARAMS]]
    shared += ["--num-iterations", "--eval-every", "--eval-tokens"]
    assert all(ours[k] == theirs[k] for k in shared)
    # Defaults mode leaves the recipe to each program.
    assert "--matrix-lr" not in cr.nanochat_command(setup, "defaults", "tag")
    assert "--matrix-lr" not in cr.our_command(setup, "defaults", tmp_path / "run")
    # Preset mode: ours runs its d4 preset's recipe, but at the compared shape, horizon and dtype.
    nanochat = cr.nanochat_command
    assert nanochat(setup, "preset", "tag") == nanochat(setup, "defaults", "tag")
    command = cr.our_command(setup, "preset", tmp_path / "run")
    config = base_train.FLAGS.parse(command[command.index("training.base_train") + 1 :])
    preset = base_train.FLAGS.load_config_file("demo-cpu")
    assert preset["dtype"] == "bf16" and preset["num_iterations"] != 300  # both overridden:
    assert config["dtype"] == "fp32" and config["num_iterations"] == 300
    assert config["sample_every"] == -1 and config["eval_tokens"] == 65536
    recipe = ("lr_batch_scaling", "warmup_steps", "warmdown_ratio", "weight_decay")
    assert all(config[k] == preset[k] for k in recipe)
    assert config["lr_batch_scaling"] is False  # the preset's recipe, not the defaults'
    env = cr.child_env(setup, "nanochat", tmp_path)
    assert env["NANOCHAT_BASE_DIR"] == str(tmp_path / "nanochat_home")
    assert env["NANOCHAT_DTYPE"] == "float32"


def nanochat_checkout() -> Path | None:
    """A nanochat source tree to run against: $NANOCHAT_SRC, else /tmp/nanochat-src."""
    for candidate in (os.environ.get("NANOCHAT_SRC"), "/tmp/nanochat-src"):
        if candidate and (Path(candidate) / "scripts" / "base_train.py").is_file():
            return Path(candidate)
    return None


@pytest.mark.timeout(1500)
def test_a_tiny_side_by_side_runs_both_programs(tmp_path, tiny_corpus, capsys):
    checkout = nanochat_checkout()
    if checkout is None:
        pytest.skip(
            "no nanochat checkout: set NANOCHAT_SRC to a nanochat source tree (CI has none; "
            "nothing of nanochat is committed here)"
        )
    data_dir, tokenizer_dir = tiny_corpus
    out = tmp_path / "compare.json"
    code = cr.main([
        "--nanochat", str(checkout), "--data-dir", str(data_dir),
        "--tokenizer-dir", str(tokenizer_dir), "--work-dir", str(tmp_path / "work"),
        "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
        "--device-batch-size", "4", "--total-batch-size", "256", "--steps", "4",
        "--eval-every", "2", "--eval-tokens", "512", "--modes", "explicit",
        "--clock-skip-steps", "1", "--time-points", "2", "--threads", "1", "--json", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    doc = json.loads(out.read_text())
    runs = {r["tool"]: r for r in doc["runs"]}
    assert set(runs) == {"ours", "nanochat"}
    for run in runs.values():
        assert run["steps"] == 4 and [s for s, _ in run["evals"]] == [0, 2, 4]
        assert run["tok_per_sec"] > 0 and run["peak_rss_tree_mib"] >= run["peak_rss_main_mib"] > 50
        assert 0 < run["final_val_bpb"] < 20
    # Same data, tokenizer and initial-weight scale: the untrained models score alike at step 0.
    start = [runs[t]["evals"][0][1] for t in ("ours", "nanochat")]
    assert abs(start[0] - start[1]) < 0.5, start
    assert "val bpb at equal steps" in printed and "val bpb at equal time" in printed
