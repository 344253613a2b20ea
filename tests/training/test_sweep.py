"""The settings sweep: variants checked before anything runs, the equal-time table, a real run."""

import json

import pytest

from training import sweep
from training.compare_reference import Curve


def test_variants_are_checked_before_anything_runs(capsys):
    assert sweep.parse_variants(["base=", "lr2x=--matrix-lr 0.04 --no-lr-batch-scaling"]) == {
        "base": [], "lr2x": ["--matrix-lr", "0.04", "--no-lr-batch-scaling"]}  # fmt: skip
    for bad, match in (("../x=--depth 3", "NAME=FLAGS"), ("nameonly", "NAME=FLAGS"),
                       ("a=--config d20", "sets --config"), ("a=--data-dir /etc", "paths")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            sweep.parse_variants([bad])
    with pytest.raises(ValueError, match="twice"):
        sweep.parse_variants(["a=", "a=--depth 3"])
    with pytest.raises(ValueError, match="1 to"):
        sweep.parse_variants([])
    assert sweep.variant_config("a", "demo-cpu", ["--warmup-steps", "0"])["warmup_steps"] == 0
    with pytest.raises(ValueError, match="refuses"):
        sweep.variant_config("a", "demo-cpu", ["--warmup-steps", "lots"])
    capsys.readouterr()


def run(name: str, repeat: int, step_seconds: float, evals) -> dict:
    curve = Curve(step_seconds={s: step_seconds for s in range(1, 5)}, evals=evals)
    return {"variant": name, "args": [], "repeat": repeat, "returncode": 0,
            "load_before": [1.0, 1.0, 1.0], "wall_seconds": 1.0, "peak_rss_mib": 100.0,
            "curve": curve, "log": "log"}  # fmt: skip


def test_the_table_compares_at_equal_training_time():
    runs = [run("fast", 0, 1.0, [(0, 4.0), (4, 2.0)]), run("slow", 0, 2.0, [(0, 4.0), (4, 1.5)])]
    text, rows = sweep.summarize(runs, {"fast": 256, "slow": 256}, skip=0, time_points=2)
    # Common end 4 s: the fast run is done (2.0); the slow one is half way (2.75).
    assert rows[0]["equal_time"][1] == {"seconds": 4.0, "val_bpb": 2.0}
    assert rows[1]["equal_time"][1]["val_bpb"] == pytest.approx(2.75)
    assert rows[0]["tok_per_sec"] == 256 and rows[1]["final_val_bpb"] == 1.5
    assert "fast" in text and "2.7500" in text


@pytest.mark.timeout(900)
def test_a_tiny_sweep_runs_each_variant(tmp_path, tiny_corpus, capsys):
    data_dir, tokenizer_dir = tiny_corpus
    out = tmp_path / "sweep.json"
    code = sweep.main([
        "--config", "tiny", "--variant", "base=--num-iterations 3 --eval-every 3",
        "--variant", "hot=--num-iterations 3 --eval-every 3 --matrix-lr 0.2",
        "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
        "--work-dir", str(tmp_path / "work"), "--clock-skip-steps", "0", "--json", str(out),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().out
    rows = json.loads(out.read_text())["runs"]
    assert [r["variant"] for r in rows] == ["base", "hot"]
    for row in rows:
        assert row["steps"] == 3 and [s for s, _ in row["evals"]] == [0, 3]
        assert row["tok_per_sec"] > 0 and row["equal_time"][-1]["val_bpb"] is not None
    # Same seed and data, different matrix LR: same start, different end.
    assert rows[0]["evals"][0] == rows[1]["evals"][0]
    assert rows[0]["final_val_bpb"] != rows[1]["final_val_bpb"]
