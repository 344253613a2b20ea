"""A pipeline run's stages become runs of their own (runs/pipeline_stages.py).

The pipeline's event file and its stages' event files are written with the real EventWriter,
as training.pipeline and the stage programs write them; the follower is the one the worker
uses. No worker or program runs here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.urls import reverse

from runs.execution import _finish
from runs.follow import Follower
from runs.models import (
    ArtifactStatus,
    Checkpoint,
    Dataset,
    EvalResult,
    Kind,
    MetricPoint,
    Run,
    Status,
)
from runs.programs import PROGRAMS
from training.events import EventWriter

pytestmark = pytest.mark.django_db


@pytest.fixture
def pipeline_run(alice, tmp_path):
    run = Run.objects.create(
        kind=Kind.PIPELINE, owner=alice, status=Status.RUNNING, name="demo",
        config=PROGRAMS["pipeline"].validate("tiny", {}), run_dir=str(tmp_path / "p"),
    )  # fmt: skip
    Path(run.run_dir).mkdir()
    return run


class FakePipeline:
    """Writes what training.pipeline and its stages write, stage by stage."""

    def __init__(self, run: Run):
        self.root = Path(run.run_dir)
        self.out = self.root / "out"
        self.events = EventWriter(self.root)
        self.events.start({}, total_steps=4, world_size=1, device="", program="pipeline")
        self.index = 0

    def stage(self, name, kind, inputs=None, outputs=None, status="started", **extra):
        stage_dir = self.root / "stages" / f"{self.index:02d}-{name}"
        self.events.emit("stage", index=self.index, name=name, kind=kind,
                         run_dir=str(stage_dir), inputs=inputs or {}, outputs=outputs or {},
                         status=status, **extra)  # fmt: skip
        return stage_dir

    def start(self, name, kind, inputs=None, outputs=None) -> tuple[Path, EventWriter]:
        self.index += 1
        self.current = (name, kind, inputs, outputs)
        stage_dir = self.stage(name, kind, inputs, outputs)
        stage_dir.mkdir(parents=True)
        (stage_dir / "log.txt").write_text(f"{name} log line\n")
        return stage_dir, EventWriter(stage_dir)

    def end(self, status="succeeded", **extra):
        self.stage(*self.current, status=status, **extra)


def test_stages_become_runs_with_their_inputs_metrics_checkpoints_and_evals(pipeline_run):
    fake = FakePipeline(pipeline_run)
    follower = Follower(pipeline_run)
    data, tok = str(fake.out / "base_data"), str(fake.out / "tokenizer")
    base_dir = str(fake.out / "base_checkpoints" / "d2")
    sft_dir = str(fake.out / "sft_checkpoints" / "d2")

    _, w = fake.start("dataset", "dataset", outputs={"data_dir": data})
    w.emit("dataset", path=data, shards=3, documents=140, characters=4000)
    w.end("succeeded")
    fake.end()
    _, w = fake.start("tokenizer", "tokenizer", inputs={"data_dir": data},
                      outputs={"tokenizer_dir": tok})  # fmt: skip
    w.end("succeeded")
    fake.end()
    follower.poll()
    dataset_run, tokenizer_run = pipeline_run.stage_runs.order_by("id")
    assert dataset_run.kind == Kind.DATASET and dataset_run.status == Status.SUCCEEDED
    assert dataset_run.dataset.path == data and dataset_run.dataset.status == ArtifactStatus.READY
    assert dataset_run.dataset.documents == 140
    assert tokenizer_run.tokenizer.path == tok
    assert tokenizer_run.tokenizer.dataset == dataset_run.dataset
    assert tokenizer_run.tokenizer.status == ArtifactStatus.READY

    # base: metrics arrive while it runs, then a checkpoint
    _, w = fake.start("base", "base", inputs={"data_dir": data, "tokenizer_dir": tok},
                      outputs={"checkpoint_dir": base_dir})  # fmt: skip
    follower.poll()
    base_run = pipeline_run.stage_runs.get(kind=Kind.BASE)
    assert base_run.status == Status.RUNNING
    assert base_run.dataset == dataset_run.dataset and base_run.tokenizer == tokenizer_run.tokenizer
    w.start({}, total_steps=10, world_size=1, device="cpu")
    for step in range(1, 11):
        w.metrics(step, {"train/loss": 5.0 - step / 10})
    follower.poll()
    assert MetricPoint.objects.filter(run=base_run, name="train/loss").count() == 10
    w.checkpoint(10, base_dir, {"model_config": {"n_layer": 2}})
    w.end("succeeded")
    fake.end(seconds=3.0)

    # SFT from the base checkpoint, then a chat eval of the SFT checkpoint
    _, w = fake.start("sft", "sft", inputs={"checkpoint_dir": base_dir},
                      outputs={"checkpoint_dir": sft_dir})  # fmt: skip
    w.checkpoint(20, sft_dir, {"model_config": {"n_layer": 2}})
    w.end("succeeded")
    fake.end()
    _, w = fake.start("chat_eval_sft", "chat_eval", inputs={"checkpoint_dir": sft_dir})
    w.eval_result("spelling_bee", "accuracy", 0.5)
    w.end("succeeded")
    fake.end()
    follower.poll()

    base_ckpt = Checkpoint.objects.get(path=base_dir)
    sft_ckpt = Checkpoint.objects.get(path=sft_dir)
    assert base_ckpt.run == base_run and base_ckpt.stage == "base"
    assert base_ckpt.tokenizer == tokenizer_run.tokenizer
    sft_run = pipeline_run.stage_runs.get(kind=Kind.SFT)
    assert sft_run.parent_checkpoint == base_ckpt
    assert sft_ckpt.run == sft_run and sft_ckpt.stage == "sft"
    result = EvalResult.objects.get(task="spelling_bee")
    assert result.checkpoint == sft_ckpt and result.run.kind == Kind.CHAT_EVAL
    assert all(r.status == Status.SUCCEEDED for r in pipeline_run.stage_runs.all())
    base_run.refresh_from_db()
    assert base_run.log_tail.strip() == "base log line"


def test_a_failed_stage_records_its_error(pipeline_run):
    fake = FakePipeline(pipeline_run)
    follower = Follower(pipeline_run)
    _, w = fake.start("sft", "sft", inputs={"checkpoint_dir": "/nowhere"})
    w.end("failed", "ValueError: mixture: /x/empty.jsonl: no conversations")
    fake.end("failed", error="ValueError: mixture: /x/empty.jsonl: no conversations")
    follower.poll()
    child = pipeline_run.stage_runs.get()
    assert child.status == Status.FAILED and "empty.jsonl: no conversations" in child.error


def test_a_stage_naming_places_outside_its_pipeline_makes_no_rows(pipeline_run, tmp_path):
    # A forged or corrupted stage line must not make rows that point at other directories
    # (which deleting the pipeline or the row would then remove).
    elsewhere = tmp_path / "someone-else"
    fake = FakePipeline(pipeline_run)
    follower = Follower(pipeline_run)
    fake.events.emit("stage", index=1, name="dataset", kind="dataset", run_dir=str(elsewhere),
                     inputs={}, outputs={}, status="started")  # fmt: skip
    fake.start("dataset", "dataset", outputs={"data_dir": str(elsewhere / "data")})
    follower.poll()
    assert not pipeline_run.stage_runs.exists()
    assert not Dataset.objects.exists()
    fake.start("tokenizer", "tokenizer", outputs={"tokenizer_dir": str(fake.out / "tokenizer")})
    follower.poll()
    assert pipeline_run.stage_runs.get().kind == Kind.TOKENIZER


def test_children_end_with_a_cancelled_pipeline(pipeline_run):
    fake = FakePipeline(pipeline_run)
    follower = Follower(pipeline_run)
    fake.start("base", "base")
    follower.poll()
    assert pipeline_run.stage_runs.get().status == Status.RUNNING
    _finish(pipeline_run, Status.CANCELLED, 130, "cancelled by request", "")
    assert pipeline_run.stage_runs.get().status == Status.CANCELLED


def test_stage_runs_are_not_reconciled_on_their_own(pipeline_run):
    from runs.execution import reconcile

    pipeline_run.heartbeat_at = None
    pipeline_run.save()
    fake = FakePipeline(pipeline_run)
    fake.start("base", "base")
    Follower(pipeline_run).poll()
    lost = reconcile(stale_after=0)
    child = pipeline_run.stage_runs.get()
    assert lost == [pipeline_run.pk]  # the pipeline is lost; its stage follows it
    child.refresh_from_db()
    assert child.status == Status.FAILED and "worker lost" in child.error


def test_pipeline_page_lists_stages_and_opens_chat_when_done(client, alice, pipeline_run):
    fake = FakePipeline(pipeline_run)
    follower = Follower(pipeline_run)
    sft_dir = str(fake.out / "sft_checkpoints" / "d2")
    _, w = fake.start("sft", "sft", outputs={"checkpoint_dir": sft_dir})
    w.checkpoint(5, sft_dir, {})
    w.end("succeeded")
    fake.end()
    follower.poll()
    Run.objects.filter(pk=pipeline_run.pk).update(status=Status.SUCCEEDED)
    client.force_login(alice)
    url = reverse("run-detail", args=[pipeline_run.pk])
    html = client.get(url).content.decode()
    checkpoint = Checkpoint.objects.get(path=sft_dir)
    assert 'id="stages-panel"' in html and 'id="open-chat"' in html
    assert f"?checkpoint={checkpoint.pk}" in html
    assert "location.replace" not in html
    html = client.get(url, {"then": "chat"}).content.decode()
    assert f'location.replace("{reverse("chat-page")}?checkpoint={checkpoint.pk}")' in html


def test_stage_runs_store_the_config_their_program_ran_with(pipeline_run, alice, tmp_path):
    """Compare then lists only what really differs between a stage and a submitted run."""
    from runs.selectors import config_diff
    from training import base_train, tok_eval, tok_train

    fake = FakePipeline(pipeline_run)
    follower = Follower(pipeline_run)
    stage_dir, w = fake.start("tokenizer", "tokenizer")
    w.start(tok_train.FLAGS.parse(["--vocab-size", "1024", "--run-dir", str(stage_dir)]),
            total_steps=0, world_size=1, device="cpu")  # fmt: skip
    w.start(
        tok_eval.FLAGS.parse(["--run-dir", str(stage_dir)]),
        total_steps=0,
        world_size=1,
        device="cpu",
    )  # fmt: skip: the evaluation, a second program of the same stage
    stage_dir, w = fake.start("base", "base")
    ran = base_train.FLAGS.parse(["--config", "tiny", "--num-iterations", "7",
                                  "--data-dir", "/d", "--run-dir", str(stage_dir)])  # fmt: skip
    w.start(ran, total_steps=7, world_size=1, device="cpu")
    follower.poll()

    tokenizer_run = pipeline_run.stage_runs.get(kind=Kind.TOKENIZER)
    expected = PROGRAMS["tokenizer"].validate("", {"vocab_size": 1024})
    assert tokenizer_run.config == {"pipeline_stage": "tokenizer", **expected}
    base_run = pipeline_run.stage_runs.get(kind=Kind.BASE)
    submitted = Run.objects.create(kind=Kind.BASE, owner=alice, status=Status.SUCCEEDED,
                                   config=PROGRAMS["base"].validate("tiny", {}))  # fmt: skip
    assert config_diff([base_run, submitted]) == [
        ("num_iterations", [7, submitted.config["num_iterations"]]),
        ("pipeline_stage", ["base", None]),
    ]


def test_a_pipeline_row_carries_its_stages_best_bpb_and_an_eta(pipeline_run, alice):
    """Earlier pipelines of the preset say how long each stage takes; the running stage's
    own ETA and this pipeline's measured pace do the rest."""
    from datetime import timedelta

    from django.utils import timezone

    earlier = Run.objects.create(kind=Kind.PIPELINE, owner=alice, status=Status.SUCCEEDED,
                                 preset=pipeline_run.preset)  # fmt: skip
    t0 = timezone.now() - timedelta(hours=1)
    for name, seconds in (("dataset", 10), ("base", 100), ("sft", 50)):
        Run.objects.create(kind=Kind.BASE, owner=alice, pipeline=earlier, status=Status.SUCCEEDED,
                           config={"pipeline_stage": name}, started_at=t0,
                           finished_at=t0 + timedelta(seconds=seconds))  # fmt: skip
    fake = FakePipeline(pipeline_run)
    fake.events.start({}, total_steps=3, world_size=1, device="", program="pipeline",
                      stages=[{"name": n, "kind": k} for n, k in
                              (("dataset", "dataset"), ("base", "base"), ("sft", "sft"))])  # fmt: skip
    follower = Follower(pipeline_run)
    _, w = fake.start("dataset", "dataset")
    w.end("succeeded")
    fake.end()
    follower.poll()
    # The dataset stage took ~0 s of its usual 10: the pace is clamped to 4x faster.
    _, w = fake.start("base", "base")
    w.metrics(1, {"train/loss": 4.0, "train/eta_sec": 30.0, "train/progress": 0.5})
    w.eval(1, {"val/bpb": 2.25})
    follower.poll()
    pipeline_run.refresh_from_db()
    assert pipeline_run.eta_seconds == pytest.approx(30.0 + 50 * 0.25)
    assert pipeline_run.best_val_bpb == 2.25


def test_pipeline_eta_from_stage_times():
    from runs.predictions import StageTime, pipeline_eta

    # Finished stages ran twice as slow as usual: the waiting stage will too.
    stages = [StageTime("a", "done", 20, typical=10), StageTime("b", "running", 5, 0.5, None, 60),
              StageTime("c", "waiting", typical=30)]  # fmt: skip
    assert pipeline_eta(stages) == pytest.approx(5 + 60)
    # Never run before: as long as this pipeline's finished stages took on average.
    assert pipeline_eta([StageTime("a", "done", 20), StageTime("c", "waiting")]) == 20
    assert pipeline_eta([StageTime("a", "running"), StageTime("c", "waiting")]) is None
    assert pipeline_eta([StageTime("a", "done", 20)]) == 0


def test_a_pipeline_page_shows_its_stages_checkpoints_evals_and_best_bpb(client, alice,
                                                                          pipeline_run):  # fmt: skip
    fake = FakePipeline(pipeline_run)
    follower = Follower(pipeline_run)
    base_dir = str(fake.out / "base_checkpoints" / "d2")
    _, w = fake.start("base", "base", outputs={"checkpoint_dir": base_dir})
    w.eval(10, {"val/bpb": 1.875})
    w.checkpoint(10, base_dir, {"model_config": {"n_layer": 2}})
    w.end("succeeded")
    fake.end()
    _, w = fake.start("base_eval", "base_eval", inputs={"checkpoint_dir": base_dir})
    w.eval_result("core", "centered", 0.0625)
    w.end("succeeded")
    fake.end()
    follower.poll()
    base_run = pipeline_run.stage_runs.get(kind=Kind.BASE)
    client.force_login(alice)
    html = client.get(reverse("run-detail", args=[pipeline_run.pk]), {"panels": "1"}).content
    html = html.decode()
    assert "No checkpoints yet." not in html and "No eval results yet." not in html
    assert f'<a href="{reverse("run-detail", args=[base_run.pk])}">base</a>' in html
    assert "0.0625" in html and ">base_eval</a>" in html
    html = client.get(reverse("run-detail", args=[pipeline_run.pk])).content.decode()
    assert '<span id="best-val-bpb">1.8750</span>' in html and 'id="best-val-bpb-stage"' in html
