"""Event lines to rows: parse_events on hand-made events, apply() against the database."""

import math
import subprocess
import sys

import pytest
from django.conf import settings
from django.db import IntegrityError

from runs import ingest
from runs.models import (
    ArtifactStatus,
    Checkpoint,
    Dataset,
    EvalResult,
    Kind,
    MetricPoint,
    Report,
    Run,
    RunEvent,
    Sample,
    Tokenizer,
)
from training.events import EVENTS_FILE, EventWriter, read_events


def metrics(step, t=100.0, **values):
    return {"type": "metrics", "time": t, "step": step, "values": values}


# ---- parse_events: pure -------------------------------------------------------------------


def test_metrics_become_points_and_non_finite_values_become_none():
    parsed = ingest.parse_events([
        {"type": "metrics", "time": 5.0, "step": 3,
         "values": {"train/loss": 2.5, "a": math.nan, "b": math.inf, "c": None, "d": "x"}},
    ])  # fmt: skip
    assert parsed.metrics == [
        ("train/loss", 3, 2.5, 5.0), ("a", 3, None, 5.0), ("b", 3, None, 5.0),
        ("c", 3, None, 5.0), ("d", 3, None, 5.0),
    ]  # fmt: skip
    assert parsed.last_step == 3


def test_eval_points_feed_eval_values_and_the_best_val_bpb():
    parsed = ingest.parse_events([
        {"type": "eval", "time": 1.0, "step": 10, "values": {"val/bpb": 1.4, "core": 0.1}},
        {"type": "eval", "time": 2.0, "step": 20, "values": {"val/bpb": 1.2, "core": math.nan}},
        {"type": "eval", "time": 3.0, "step": 30, "values": {"val/bpb": 1.3}},
    ])  # fmt: skip
    assert [(n, s, v) for n, s, v, _ in parsed.metrics] == [
        ("val/bpb", 10, 1.4), ("core", 10, 0.1), ("val/bpb", 20, 1.2), ("core", 20, None),
        ("val/bpb", 30, 1.3),
    ]  # fmt: skip
    assert parsed.min_val_bpb == 1.2
    assert parsed.eval_values == {"val/bpb": 1.3, "core": 0.1}
    assert parsed.last_step is None  # eval events do not move the run's step
    # the headline scores are eval results too (the leaderboard's CORE / ChatCORE columns)
    assert [(r["task"], r["metric"], r["value"]) for r in parsed.eval_results] == [
        ("CORE", "score", 0.1)
    ]


def test_chatcore_of_an_eval_event_is_an_eval_result():
    parsed = ingest.parse_events(
        [{"type": "eval", "time": 1.0, "step": 5, "values": {"chatcore": 0.25, "x": 1.0}}]
    )
    assert [(r["task"], r["value"]) for r in parsed.eval_results] == [("ChatCORE", 0.25)]


def test_start_progress_and_eta():
    parsed = ingest.parse_events([
        {"type": "start", "time": 0.0, "config": {"depth": 4}, "total_steps": 500},
        metrics(1, **{"train/progress": 0.2, "train/eta_sec": 40.0}),
        metrics(3, **{"train/progress": 0.6}),  # no ETA in this one: the last known stays
        metrics(2, **{"train/loss": 3.0}),
    ])  # fmt: skip
    assert parsed.start == {"config": {"depth": 4}, "total_steps": 500}
    assert parsed.last_step == 3
    assert parsed.progress == 0.6
    assert parsed.eta == 40.0


def test_a_reported_progress_of_zero_counts():
    parsed = ingest.parse_events([metrics(0, **{"train/progress": 0.0})])
    assert parsed.progress == 0.0


def test_checkpoints_samples_eval_results_and_reports():
    parsed = ingest.parse_events([
        {"type": "eval_result", "time": 1.0, "task": "core", "value": 0.2},
        {"type": "checkpoint", "time": 2.0, "step": 100, "path": "/ck", "meta": {"val_bpb": 1.1}},
        {"type": "checkpoint", "time": 2.0, "step": 200, "path": "/ck", "meta": "not a dict"},
        {"type": "sample", "time": 3.0, "step": 200, "prompt": "Hi", "completion": " there"},
        {"type": "eval_result", "time": 4.0, "task": "arc", "metric": "acc", "value": 0.5,
         "details": {"n": 10}},
        {"type": "report", "time": 5.0, "section": "Base", "markdown": "# Base"},
        {"type": "report", "time": 5.0, "markdown": "untitled"},
    ])  # fmt: skip
    assert parsed.checkpoints == [
        {"step": 100, "path": "/ck", "meta": {"val_bpb": 1.1}},
        {"step": 200, "path": "/ck", "meta": {}},
    ]
    assert parsed.samples == [(200, "Hi", " there")]
    assert parsed.eval_results == [
        {"task": "core", "metric": "accuracy", "value": 0.2, "details": {},
         "data_source": "", "checkpoint_index": -1},
        {"task": "arc", "metric": "acc", "value": 0.5, "details": {"n": 10},
         "data_source": "", "checkpoint_index": 1},
    ]  # fmt: skip
    assert parsed.reports == [("Base", "# Base"), ("Report", "untitled")]


def test_dataset_tokenizer_and_end_events():
    parsed = ingest.parse_events([
        {"type": "dataset", "time": 1.0, "path": "/d", "shards": 2, "documents": 10},
        {"type": "tokenizer", "time": 2.0, "path": "/t", "vocab_size": 512},
        {"type": "end", "time": 3.0, "status": "failed", "error": "boom"},
    ])  # fmt: skip
    assert parsed.dataset == {"path": "/d", "shards": 2, "documents": 10}
    assert parsed.tokenizer == {"path": "/t", "vocab_size": 512}
    assert parsed.end == {"status": "failed", "error": "boom"}


def test_malformed_events_are_kept_as_events_but_make_no_rows():
    parsed = ingest.parse_events([
        {"type": "metrics", "time": 1.0, "step": 1, "values": [1, 2]},
        {"type": "metrics", "time": 1.0, "values": {"a": 1.0}},  # no step
        {"type": "metrics", "time": 1.0, "step": "ten", "values": {"a": 1.0}},
        {"type": "metrics", "time": 1.0, "step": 1.5, "values": {"a": 1.0}},
        {"type": "metrics", "time": 1.0, "step": 10**12, "values": {"a": 1.0}},
        {"type": "metrics", "time": 1.0, "step": True, "values": {"a": 1.0}},
        {"type": "checkpoint", "time": 1.0, "step": 5},  # no path
        {"type": "checkpoint", "time": 1.0, "step": 5, "path": "x" * 1000},
        {"type": "sample", "time": 1.0, "prompt": "no step"},
        {"type": "eval_result", "time": 1.0, "metric": "acc", "value": 1.0},  # no task
        {"type": "report", "time": 1.0, "section": "S", "markdown": 42},
        {"type": "something-new", "time": 1.0, "step": 3},
        {"type": "metrics", "time": "yesterday", "step": 2, "values": {"a": 1.0}},
    ])  # fmt: skip
    assert len(parsed.events) == 13
    assert parsed.metrics == [("a", 2, 1.0, 0.0)]  # only the last one (its time is unusable)
    assert parsed.checkpoints == parsed.samples == parsed.eval_results == parsed.reports == []
    assert parsed.events[11] == ("something-new", 1.0, 3, {"step": 3})


def test_events_keep_their_fields_with_non_finite_numbers_as_null():
    parsed = ingest.parse_events([
        {"type": "eval_result", "time": 7.5, "task": "t", "value": math.nan,
         "details": {"per_item": [1.0, math.inf]}},
    ])  # fmt: skip
    ((kind, when, step, data),) = parsed.events
    assert (kind, when, step) == ("eval_result", 7.5, None)
    assert data == {"task": "t", "value": None, "details": {"per_item": [1.0, None]}}
    assert parsed.eval_results[0]["value"] is None


def test_metrics_payload_groups_by_name_and_gives_up_on_a_backlog():
    parsed = ingest.parse_events([metrics(1, 1.0, a=1.0, b=2.0), metrics(2, 2.0, a=0.5)])
    assert ingest.metrics_payload(parsed) == {
        "a": [[1, 1.0, 1.0], [2, 0.5, 2.0]],
        "b": [[1, 2.0, 1.0]],
    }
    assert ingest.metrics_payload(parsed, limit=2) is None


def test_checkpoint_size_counts_every_file_of_one_step(tmp_path):
    (tmp_path / "model_000100.pt").write_bytes(b"x" * 1000)
    (tmp_path / "meta_000100.json").write_bytes(b"x" * 20)
    (tmp_path / "optim_000100_rank0.pt").write_bytes(b"x" * 300)
    (tmp_path / "optim_000100_rank1.pt").write_bytes(b"x" * 300)
    (tmp_path / "model_000200.pt").write_bytes(b"x" * 5000)
    assert ingest.checkpoint_size(str(tmp_path), 100) == 1620
    assert ingest.checkpoint_size(str(tmp_path), 300) == 0
    assert ingest.checkpoint_size(str(tmp_path / "missing"), 100) is None


# ---- apply: against the database ----------------------------------------------------------


@pytest.fixture
def tokenizer(db, tmp_path):
    dataset = Dataset.objects.create(
        name="corpus", source=Dataset.Source.BUILTIN, path=str(tmp_path / "data"),
        status=ArtifactStatus.READY,
    )  # fmt: skip
    return Tokenizer.objects.create(
        name="tok", dataset=dataset, path=str(tmp_path / "tok"), vocab_size=512,
        status=ArtifactStatus.READY,
    )  # fmt: skip


@pytest.fixture
def run(tokenizer, tmp_path):
    return Run.objects.create(
        kind=Kind.BASE, dataset=tokenizer.dataset, tokenizer=tokenizer, run_dir=str(tmp_path)
    )


def apply(run, events, offset=None):
    offset = run.events_offset + 100 if offset is None else offset
    return ingest.apply(run, ingest.parse_events(events), offset)


def test_apply_stores_events_points_and_run_fields(run):
    apply(run, [
        {"type": "start", "time": 0.0, "total_steps": 10},
        metrics(1, 1.0, **{"train/loss": 4.0, "train/eta_sec": 90.0}),
        metrics(2, 2.0, **{"train/loss": math.nan}),
        {"type": "eval", "time": 3.0, "step": 2, "values": {"val/bpb": 1.5}},
    ], offset=321)  # fmt: skip
    run.refresh_from_db()
    assert (run.step, run.total_steps, run.progress, run.eta_seconds) == (2, 10, 0.2, 90.0)
    assert run.best_val_bpb == 1.5
    assert (run.events_offset, run.events_count) == (321, 4)
    events = list(RunEvent.objects.filter(run=run).order_by("seq"))
    assert [(e.seq, e.type, e.step) for e in events] == [
        (0, "start", None), (1, "metrics", 1), (2, "metrics", 2), (3, "eval", 2),
    ]  # fmt: skip
    assert events[0].data == {"total_steps": 10}
    assert events[2].data == {"step": 2, "values": {"train/loss": None}}
    points = MetricPoint.objects.filter(run=run).order_by("step", "name")
    assert [(p.name, p.step, p.value, p.time) for p in points] == [
        ("train/eta_sec", 1, 90.0, 1.0), ("train/loss", 1, 4.0, 1.0),
        ("train/loss", 2, None, 2.0), ("val/bpb", 2, 1.5, 3.0),
    ]  # fmt: skip


def test_a_second_batch_continues_the_sequence_and_keeps_the_best(run):
    apply(run, [{"type": "eval", "time": 1.0, "step": 5, "values": {"val/bpb": 1.2}}], 50)
    apply(run, [
        {"type": "eval", "time": 2.0, "step": 6, "values": {"val/bpb": 1.3}},
        metrics(6, 2.0, **{"train/progress": 0.75}),
    ], 90)  # fmt: skip
    apply(run, [metrics(4, 3.0, a=1.0)], 120)  # an older step never moves the run back
    run.refresh_from_db()
    assert list(RunEvent.objects.filter(run=run).values_list("seq", flat=True)) == [0, 1, 2, 3]
    assert (run.events_offset, run.events_count) == (120, 4)
    assert run.best_val_bpb == 1.2
    assert (run.step, run.progress) == (6, 0.75)


def test_a_batch_is_all_or_nothing(run):
    # A row already holding the seq the batch's second event will take makes the insert fail.
    RunEvent.objects.create(run=run, seq=1, type="metrics", time=0.0)
    with pytest.raises(IntegrityError):
        apply(run, [metrics(1, a=1.0), metrics(2, a=2.0)], offset=77)
    run.refresh_from_db()
    assert (run.events_offset, run.events_count, run.step) == (0, 0, 0)
    assert not MetricPoint.objects.filter(run=run).exists()


def test_checkpoints_are_recorded_with_their_size_on_disk(run, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "model_000100.pt").write_bytes(b"m" * 4096)
    (folder / "meta_000100.json").write_bytes(b"{}")
    (folder / "optim_000100_rank0.pt").write_bytes(b"o" * 1024)
    event = {"type": "checkpoint", "time": 1.0, "step": 100, "path": str(folder),
             "meta": {"val_bpb": 1.25, "model_config": {"n_layer": 4}}}  # fmt: skip
    (created,) = apply(run, [event])
    assert created.size_bytes == 4096 + 2 + 1024
    assert (created.run, created.tokenizer, created.stage) == (run, run.tokenizer, "base")
    assert (created.val_bpb, created.depth) == (1.25, 4)
    # Re-reading the same event (a resumed run) updates the row instead of failing.
    (again,) = apply(run, [event])
    assert again.pk == created.pk
    assert Checkpoint.objects.filter(run=run).count() == 1


def test_a_stage_without_a_program_yet_is_named_after_the_kind(tokenizer, tmp_path):
    run = Run.objects.create(kind=Kind.SFT, tokenizer=tokenizer, run_dir=str(tmp_path))
    event = {"type": "checkpoint", "time": 1, "step": 1, "path": f"{run.run_dir}/sft"}
    (created,) = apply(run, [event])
    assert created.stage == "sft"
    assert created.size_bytes is None  # the directory does not exist here


def test_eval_results_go_to_the_checkpoint_saved_before_them(run):
    folder = f"{run.run_dir}/ck"
    apply(run, [{"type": "checkpoint", "time": 1.0, "step": 100, "path": folder}])
    apply(run, [
        {"type": "eval_result", "time": 2.0, "task": "early", "value": 0.1},
        {"type": "checkpoint", "time": 3.0, "step": 200, "path": folder},
        {"type": "eval_result", "time": 4.0, "task": "final", "value": 0.3},
    ])  # fmt: skip
    steps = dict(EvalResult.objects.filter(run=run).values_list("task", "checkpoint__step"))
    assert steps == {"early": 100, "final": 200}


def test_eval_results_record_the_data_source_their_program_reported(run):
    apply(run, [
        {"type": "eval_result", "time": 1.0, "task": "arc_easy", "value": 0.3,
         "data_source": "offline"},
        {"type": "eval_result", "time": 1.0, "task": "mmlu", "value": 0.4, "data_source": "hub"},
        {"type": "eval", "time": 2.0, "step": 0, "values": {"core": 0.1},
         "data_source": "offline"},
        {"type": "eval_result", "time": 3.0, "task": "old-file", "value": 0.5},
        {"type": "eval_result", "time": 3.0, "task": "odd", "value": 0.5, "data_source": "x"},
    ])  # fmt: skip
    sources = dict(EvalResult.objects.filter(run=run).values_list("task", "data_source"))
    assert sources == {"arc_easy": "offline", "mmlu": "hub", "CORE": "offline",
                       "old-file": "", "odd": ""}  # fmt: skip


def test_eval_results_of_a_run_without_checkpoints_have_none(run):
    apply(run, [{"type": "eval_result", "time": 2.0, "task": "core", "value": 0.1}])
    assert EvalResult.objects.get(run=run).checkpoint is None


def test_an_eval_run_scores_its_parent_checkpoint(run, tokenizer, tmp_path):
    parent = Checkpoint.objects.create(run=run, stage="base", step=500, path="/base")
    Checkpoint.objects.create(run=run, stage="base", step=600, path="/base")
    evaluation = Run.objects.create(
        kind=Kind.BASE_EVAL, tokenizer=tokenizer, parent_checkpoint=parent, run_dir=str(tmp_path)
    )
    apply(evaluation, [
        {"type": "eval_result", "time": 1.0, "task": "arc", "metric": "acc", "value": 0.4,
         "details": {"n": 100}},
    ])  # fmt: skip
    result = EvalResult.objects.get(run=evaluation)
    assert (result.checkpoint, result.task, result.metric, result.value) == (
        parent, "arc", "acc", 0.4,
    )  # fmt: skip
    assert result.details == {"n": 100}


def test_samples_and_reports_are_stored(run):
    apply(run, [
        {"type": "sample", "time": 1.0, "step": 10, "prompt": "2+2=", "completion": "4"},
        {"type": "report", "time": 2.0, "section": "Base", "markdown": "## Base\n- ok"},
    ])  # fmt: skip
    assert list(Sample.objects.filter(run=run).values_list("step", "prompt", "completion")) == [
        (10, "2+2=", "4")
    ]
    assert list(Report.objects.filter(run=run).values_list("section", "markdown")) == [
        ("Base", "## Base\n- ok")
    ]


def test_a_dataset_event_fills_in_the_dataset(tokenizer, tmp_path):
    run = Run.objects.create(kind=Kind.DATASET, dataset=tokenizer.dataset, run_dir=str(tmp_path))
    apply(run, [{"type": "dataset", "time": 1.0, "shards": 4, "documents": 1000,
                 "characters": 123456, "bytes_on_disk": 99, "source": "builtin"}])  # fmt: skip
    dataset = Dataset.objects.get(pk=tokenizer.dataset.pk)
    assert (dataset.shards, dataset.documents, dataset.characters, dataset.bytes_on_disk) == (
        4, 1000, 123456, 99,
    )  # fmt: skip


def test_bad_dataset_numbers_are_ignored(tokenizer, tmp_path):
    run = Run.objects.create(kind=Kind.DATASET, dataset=tokenizer.dataset, run_dir=str(tmp_path))
    apply(run, [{"type": "dataset", "time": 1.0, "shards": -1, "documents": "many",
                 "characters": 10}])  # fmt: skip
    dataset = Dataset.objects.get(pk=tokenizer.dataset.pk)
    assert (dataset.shards, dataset.documents, dataset.characters) == (None, None, 10)


def test_a_tokenizer_run_records_vocab_size_and_compression_stats(tokenizer, tmp_path):
    tokenizer.stats = {"bytes_per_token/old": 3.0}
    tokenizer.save()
    run = Run.objects.create(
        kind=Kind.TOKENIZER, dataset=tokenizer.dataset, tokenizer=tokenizer, run_dir=str(tmp_path)
    )
    apply(run, [
        {"type": "tokenizer", "time": 1.0, "vocab_size": 1024},
        {"type": "eval", "time": 2.0, "step": 0, "values": {"bytes_per_token/news": 4.1}},
    ])  # fmt: skip
    tokenizer.refresh_from_db()
    assert tokenizer.vocab_size == 1024
    assert tokenizer.stats == {"bytes_per_token/old": 3.0, "bytes_per_token/news": 4.1}


def test_non_finite_numbers_inside_event_data_are_stored_as_null(run):
    apply(run, [{"type": "end", "time": 1.0, "status": "failed", "loss": math.nan}])
    assert RunEvent.objects.get(run=run).data == {"status": "failed", "loss": None}


def test_a_followed_event_file_lands_exactly_once(run, tmp_path):
    """What the follower does: read from the stored offset, parse, apply, repeat."""
    path = tmp_path / EVENTS_FILE
    with EventWriter(tmp_path) as writer:
        writer.start({"depth": 2}, total_steps=4, world_size=1, device="cpu")
        writer.metrics(1, {"train/loss": 3.0})
        writer.metrics(2, {"train/loss": 2.5})
    for _ in range(2):  # the second poll finds nothing new
        result = read_events(path, run.events_offset)
        ingest.apply(run, ingest.parse_events(result.events), result.offset)
    with EventWriter(tmp_path) as writer:
        writer.metrics(3, {"train/loss": 2.0})
    result = read_events(path, run.events_offset)
    ingest.apply(run, ingest.parse_events(result.events), result.offset)
    run.refresh_from_db()
    assert run.events_offset == path.stat().st_size
    assert run.events_count == 4
    assert list(MetricPoint.objects.filter(run=run).order_by("step").values_list("value")) == [
        (3.0,),
        (2.5,),
        (2.0,),
    ]
    assert (run.step, run.progress) == (3, 0.75)


def test_the_ingestion_benchmark_runs_and_checks_its_rows():
    """A small run of runs/bench_ingest.py (own scratch database) keeps the script working."""
    result = subprocess.run(
        [sys.executable, "-m", "runs.bench_ingest", "--points", "600", "--chunk-lines", "50"],
        cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "120 metrics events x 5 values = 600 points" in lines[0]
    assert "whole file, 1 batch" in lines[1] and "points/s" in lines[1]
    assert "50-line chunks" in lines[2] and "3 polls" in lines[2]
