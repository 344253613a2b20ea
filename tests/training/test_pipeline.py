"""The whole pipeline, end to end on the `tiny` preset: every stage a real process.

What a user's first run must leave behind: base and SFT checkpoints, CORE and ChatCORE in
[-1, 1], a report whose summary has BASE and SFT columns, and an SFT model that answers a
spelling question in the `#### <n>` format more often than the base model does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training import pipeline
from training.events import read_events

pytestmark = pytest.mark.timeout(600)


def stage_events(run_dir: Path, name: str) -> list[dict]:
    [stage_dir] = (run_dir / "stages").glob(f"*-{name}")
    return read_events(stage_dir / "events.jsonl").events


def format_rate(run_dir: Path, name: str) -> float:
    [result] = [e for e in stage_events(run_dir, name)
                if e["type"] == "eval_result" and e["task"] == "spelling_bee"
                and e["metric"] == "format"]  # fmt: skip
    return result["value"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    code = pipeline.main(["--config", "tiny", "--out-dir", str(out), "--run-dir", str(out / "run")])
    return code, out, out / "run"


def test_tiny_pipeline_runs_every_stage(tiny_pipeline):
    code, out, run_dir = tiny_pipeline
    assert code == 0, (run_dir / "events.jsonl").read_text()[-3000:]
    events = read_events(run_dir / "events.jsonl").events
    finished = [e["name"] for e in events if e["type"] == "stage" and e["status"] == "succeeded"]
    assert finished == ["dataset", "tokenizer", "base", "base_eval", "chat_eval_base", "sft",
                        "chat_eval_sft"]  # fmt: skip
    assert events[-1] == {**events[-1], "type": "end", "status": "succeeded"}
    assert any(out.glob("base_checkpoints/d2/meta_*.json"))
    meta = json.loads(next(out.glob("sft_checkpoints/d2/meta_*.json")).read_text())
    assert meta.get("stage") == "sft"
    # every stage's own event file ends with its own end event, and it wrote a log
    for stage_dir in (run_dir / "stages").iterdir():
        assert read_events(stage_dir / "events.jsonl").events[-1]["type"] == "end"
        assert (stage_dir / "log.txt").stat().st_size > 0


def test_tiny_pipeline_scores_and_report(tiny_pipeline):
    _, out, run_dir = tiny_pipeline
    [core] = [e["values"]["core"] for e in stage_events(run_dir, "base_eval")
              if e["type"] == "eval"]  # fmt: skip
    [chatcore] = [e["values"]["chatcore"] for e in stage_events(run_dir, "chat_eval_sft")
                  if e["type"] == "eval" and "chatcore" in e["values"]]  # fmt: skip
    assert -1 <= core <= 1 and -1 <= chatcore <= 1
    report = (out / "report" / "report.md").read_text()
    summary = report[report.index("## Summary") :]
    assert "| Metric | BASE | SFT |" in summary
    assert "| CORE |" in summary and "| ChatCORE |" in summary
    assert report.index("## Base model training") < report.index("## Chat SFT")
    events = read_events(run_dir / "events.jsonl").events
    assert any(e["type"] == "report" and "## Summary" in e["markdown"] for e in events)


def test_sft_answers_spelling_questions_in_the_format_more_often_than_base(tiny_pipeline):
    _, _, run_dir = tiny_pipeline
    assert format_rate(run_dir, "chat_eval_sft") > format_rate(run_dir, "chat_eval_base")


def test_skip_existing_then_a_failing_stage_stops_the_pipeline(tiny_pipeline, tmp_path):
    """Outputs there: every stage up to SFT is skipped; SFT on an empty file fails, naming it,
    and nothing after it runs."""
    _, finished, _ = tiny_pipeline
    out = tmp_path / "out"  # a copy without the SFT model (the fixture's outputs stay intact)
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("sft_checkpoints", "run"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    run_dir = tmp_path / "run"
    code = pipeline.main([
        "--config", "tiny", "--out-dir", str(out), "--run-dir", str(run_dir), "--skip-existing",
        "--model-tag", "d2", "--sft-args", f"--mixture customjson:{empty}",
    ])  # fmt: skip
    assert code == 1
    events = read_events(run_dir / "events.jsonl").events
    status = {e["name"]: e["status"] for e in events if e["type"] == "stage"}
    assert status["base"] == "skipped" and status["dataset"] == "skipped"
    assert "chat_eval_sft" not in status
    end = events[-1]
    assert end["type"] == "end" and end["status"] == "failed"
    assert "stage sft failed" in end["error"] and str(empty) in end["error"]


def test_plan_follows_the_options(tmp_path):
    config = pipeline.FLAGS.validate({**pipeline.FLAGS.load_config_file("tiny"), "mid": True,
                                      "rl": True, "out_dir": str(tmp_path)})  # fmt: skip
    names = [s.name for s in pipeline.plan(config)]
    assert names == ["dataset", "tokenizer", "base", "base_eval", "chat_eval_base", "mid", "sft",
                     "chat_eval_sft", "rl", "chat_eval_rl"]  # fmt: skip
    sft = next(s for s in pipeline.plan(config) if s.name == "sft")
    assert sft.inputs["checkpoint_dir"].endswith("mid_checkpoints/d2")
