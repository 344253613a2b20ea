"""Runs executed for real: API submission -> Redis -> a Celery worker process -> torchrun.

Nothing is eager or mocked here: the worker is `celery worker` in its own process group on the
test database, the programs run under torchrun, cancel signals real process groups, and the
lost-worker test SIGKILLs the worker and waits for the beat-driven reconciler.
"""

from __future__ import annotations

import time
import uuid

import psutil
import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils.html import escape
from rest_framework.test import APIClient

from runs.models import (
    Checkpoint,
    Dataset,
    MetricPoint,
    ProbeAnswer,
    Run,
    RunEvent,
    Status,
    Tokenizer,
)
from runs.programs import PROGRAMS
from tests.chat.conftest import EngineWorkerProcess
from tests.runs.live_workers import LiveWorker, build_small_inputs, run_processes, wait_for

pytestmark = [pytest.mark.timeout(400), pytest.mark.django_db(transaction=True)]

TINY = {"num_iterations": 150, "eval_every": 50, "sample_every": -1}


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    """A small dataset and tokenizer on disk, built once with the real programs."""
    return build_small_inputs(tmp_path_factory.mktemp("prebuilt"))


@pytest.fixture(scope="module")
def workers(redis_url, tmp_path_factory, django_db_setup, django_db_blocker):
    """A training worker and a default worker running beat (reconciler every 2 s); probes
    ask the engine channel of the `engine` fixture."""
    logs = tmp_path_factory.mktemp("workers")
    env = {"RUNS_RECONCILE_SECONDS": "2", "RUNS_STALE_SECONDS": "8", "RUNS_HEARTBEAT_SECONDS": "1",
           "CHAT_ENGINE_CHANNEL": f"engine-test-{uuid.uuid4().hex[:12]}"}  # fmt: skip
    with django_db_blocker.unblock():
        pool = {
            "training": LiveWorker("training", logs, **env),
            "default": LiveWorker("default", logs, beat=True, **env),
        }
    pool["env"], pool["logs"] = env, logs
    yield pool
    for key in ("training", "default"):
        pool[key].stop()


@pytest.fixture(scope="module")
def engine(workers):
    """An engine worker on the channel the default worker's probe tasks ask."""
    channel = workers["env"]["CHAT_ENGINE_CHANNEL"]
    worker = EngineWorkerProcess(channel, workers["logs"] / "engine.log")
    yield worker
    worker.stop()


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw")


@pytest.fixture
def api(alice):
    client = APIClient()
    client.force_authenticate(alice)
    return client


@pytest.fixture
def inputs(prebuilt, alice):
    data, tok = prebuilt
    dataset = Dataset.objects.create(
        name="prebuilt", owner=alice, source="path", path=str(data), status="ready"
    )
    tokenizer = Tokenizer.objects.create(
        name="prebuilt-512", owner=alice, dataset=dataset, path=str(tok), status="ready",
        vocab_size=512,
    )  # fmt: skip
    return dataset, tokenizer


def run_info(run_id: int, workers=None):
    def info() -> str:
        run = Run.objects.get(pk=run_id)
        text = f"run {run_id}: {run.status} step {run.step} error={run.error!r}\n{run.log_tail}"
        if workers:
            text += "\n--- training worker ---\n" + workers["training"].log()
        return text

    return info


def wait_status(run_id: int, statuses, timeout: float, workers=None) -> Run:
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)
    return wait_for(
        lambda: Run.objects.filter(pk=run_id, status__in=statuses).first(),
        timeout, f"run {run_id} to be {'/'.join(statuses)}", info=run_info(run_id, workers),
    )  # fmt: skip


def submit_base(api, inputs, probe_prompts=(), **config) -> int:
    dataset, tokenizer = inputs
    response = api.post(
        "/api/runs/",
        {"kind": "base", "preset": "tiny", "config": {**TINY, **config},
         "dataset": dataset.pk, "tokenizer": tokenizer.pk, "probe_prompts": list(probe_prompts)},
        format="json",
    )  # fmt: skip
    assert response.status_code == 201, response.content
    return response.json()["id"]


@pytest.mark.services
def test_dataset_tokenizer_and_base_run_through_a_real_worker(api, alice, workers, engine):
    response = api.post(
        "/api/datasets/",
        {"name": "docs", "source": "builtin", "options": {"max_chars": 200000, "shards": 3}},
        format="json",
    )
    assert response.status_code == 201, response.content
    dataset = Dataset.objects.get(name="docs")
    build = dataset.runs.get(kind="dataset")
    wait_status(build.pk, Status.SUCCEEDED, 120, workers)
    dataset.refresh_from_db()
    assert dataset.status == "ready" and dataset.shards == 3 and dataset.documents > 10

    response = api.post(
        "/api/tokenizers/",
        {"name": "docs-512", "dataset": dataset.pk, "config": {"vocab_size": 512}},
        format="json",
    )
    assert response.status_code == 201, response.content
    tokenizer = Tokenizer.objects.get(name="docs-512")
    wait_status(tokenizer.runs.get(kind="tokenizer").pk, Status.SUCCEEDED, 120, workers)
    tokenizer.refresh_from_db()
    assert tokenizer.status == "ready"
    assert tokenizer.stats["tok/bytes_per_token/val"] > 1.0

    prompts = ["The capital of France is", "Once upon a time"]
    run_id = submit_base(api, (dataset, tokenizer), prompts, save_every=75)
    run = wait_status(run_id, [Status.SUCCEEDED, Status.FAILED], 240, workers)
    assert run.status == Status.SUCCEEDED, run_info(run_id, workers)()
    assert run.exit_code == 0 and run.step == 150 and run.progress == 1.0
    assert run.host and run.pid and run.started_at < run.finished_at
    assert run.best_val_bpb is not None and run.best_val_bpb > 0

    assert MetricPoint.objects.filter(run=run, name="train/loss").count() == 150
    assert MetricPoint.objects.filter(run=run, name="val/bpb").count() == 4  # 0, 50, 100, 150
    middle, checkpoint = Checkpoint.objects.filter(run=run).order_by("step")
    assert (middle.step, checkpoint.step) == (75, 150) and checkpoint.stage == "base"
    assert checkpoint.size_bytes > 0 and checkpoint.model_config["n_layer"] == 2
    types = set(RunEvent.objects.filter(run=run).values_list("type", flat=True))
    assert {"start", "metrics", "eval", "checkpoint", "report", "end"} <= types
    assert run.reports.filter(section="Base model training").exists()

    # Each checkpoint answered the probes on the engine worker, and the run page shows them.
    def probe_answers():
        rows = list(ProbeAnswer.objects.filter(run=run).order_by("step", "index"))
        return rows if len(rows) == 4 else None

    answers = wait_for(probe_answers, 90, "the probe answers",
                       info=lambda: workers["default"].log() + engine.log())  # fmt: skip
    assert [(a.step, a.index, a.prompt) for a in answers] == [
        (75, 0, prompts[0]), (75, 1, prompts[1]), (150, 0, prompts[0]), (150, 1, prompts[1])
    ]  # fmt: skip
    assert [a.error for a in answers] == [""] * 4
    browser = Client()
    browser.force_login(alice)
    page = browser.get(f"/runs/{run_id}/").content.decode()
    assert 'id="probes-panel"' in page and 'data-step="75"' in page and 'data-step="150"' in page
    assert all(escape(a.text) in page for a in answers) and escape(prompts[0]) in page

    response = api.get(f"/api/runs/{run_id}/metrics/", {"names": "train/loss", "max_points": 100})
    assert response.status_code == 200, response.content
    loss = response.json()["series"]["train/loss"]
    assert 2 <= len(loss["step"]) <= 100
    assert loss["step"][0] == 1 and loss["step"][-1] == 150
    assert loss["step"] == sorted(loss["step"])


def test_pipeline_from_the_api_shows_every_stage_as_a_run(api, workers):
    """The `pipeline` kind (what the dashboard's quick start launches), tiny preset: each stage
    a run of its own with its charts, checkpoints and eval results; chat picks the SFT model."""
    from chat.services import checkpoints_for_picker
    from runs.selectors import leaderboard

    response = api.post("/api/runs/", {"kind": "pipeline", "preset": "tiny"}, format="json")
    assert response.status_code == 201, response.content
    run_id = response.json()["id"]
    run = wait_status(run_id, [Status.SUCCEEDED, Status.FAILED], 400, workers)
    assert run.status == Status.SUCCEEDED, run_info(run_id, workers)()
    stages = {child.config["pipeline_stage"]: child for child in run.stage_runs.order_by("id")}
    assert list(stages) == ["dataset", "tokenizer", "base", "base_eval", "chat_eval_base", "sft",
                            "chat_eval_sft"]  # fmt: skip
    assert all(child.status == Status.SUCCEEDED for child in stages.values())
    # Each stage records the config its program ran with, as a submitted run of its kind does.
    base_config = stages["base"].config
    assert set(base_config) == {"pipeline_stage", *PROGRAMS["base"].validate("tiny", {})}
    assert base_config["data_dir"] == "" and base_config["num_iterations"] > 0
    assert run.best_val_bpb == min(c.best_val_bpb for c in stages.values() if c.best_val_bpb)
    assert stages["dataset"].dataset.status == "ready"
    assert stages["tokenizer"].tokenizer.status == "ready"
    assert MetricPoint.objects.filter(run=stages["base"], name="train/loss").count() == 60
    base_ckpt = Checkpoint.objects.get(run=stages["base"])
    sft_ckpt = Checkpoint.objects.get(run=stages["sft"])
    assert sft_ckpt.stage == "sft" and stages["sft"].parent_checkpoint == base_ckpt
    assert stages["base_eval"].eval_results.filter(checkpoint=base_ckpt).exists()
    chatcore = MetricPoint.objects.get(run=stages["chat_eval_sft"], name="chatcore").value
    assert -1 <= chatcore <= 1
    assert stages["chat_eval_sft"].eval_results.filter(checkpoint=sft_ckpt).count() >= 6
    assert run.reports.filter(section="Report").exists()
    assert checkpoints_for_picker().first() == sft_ckpt  # the first chat is with the SFT model
    board = {row.checkpoint: row.scores for row in leaderboard()}
    assert -1 <= board[base_ckpt]["CORE"] <= 1 and board[sft_ckpt]["ChatCORE"] == chatcore


def test_cancel_stops_every_process_of_the_run_within_10_seconds(api, inputs, workers):
    run_id = submit_base(api, inputs, num_iterations=100000, eval_every=-1)
    run = wait_for(
        lambda: Run.objects.filter(pk=run_id, status=Status.RUNNING, step__gt=2).first(),
        120, "the run to train a few steps", info=run_info(run_id, workers),
    )  # fmt: skip
    members = run_processes(run.pid)
    assert len(members) >= 2, "torchrun and its rank"

    response = api.post(f"/api/runs/{run_id}/cancel/")
    assert response.status_code == 200, response.content
    cancelled_at = time.monotonic()
    run = wait_status(run_id, [Status.CANCELLED, Status.FAILED, Status.SUCCEEDED], 10, workers)
    assert run.status == Status.CANCELLED
    gone, alive = psutil.wait_procs(
        members, timeout=max(0.1, 10 - (time.monotonic() - cancelled_at))
    )
    assert not alive, f"still running after cancel: {alive}"


def test_a_program_that_raises_fails_with_its_error_and_log(api, inputs, workers, tmp_path):
    dataset, tokenizer = inputs
    empty = Dataset.objects.create(
        name="empty", owner=dataset.owner, source="path", path=str(tmp_path), status="ready"
    )
    run_id = submit_base(api, (empty, tokenizer))
    run = wait_status(run_id, [Status.FAILED, Status.SUCCEEDED], 120, workers)
    assert run.status == Status.FAILED
    assert run.exit_code not in (0, None)
    assert str(tmp_path) in run.error  # the program's own error line names the directory
    assert "Traceback" not in run.error
    assert "training.base_train" in run.log_tail or str(tmp_path) in run.log_tail


def test_killed_worker_is_detected_and_the_run_resumes_from_its_checkpoint(api, inputs, workers):
    run_id = submit_base(api, inputs, num_iterations=400, save_every=20, eval_every=-1)
    wait_for(
        lambda: Checkpoint.objects.filter(run_id=run_id, step__gte=40).exists(),
        180, "a checkpoint", info=run_info(run_id, workers),
    )  # fmt: skip
    run = Run.objects.get(pk=run_id)
    assert run.status == Status.RUNNING
    training = run_processes(run.pid)

    workers["training"].kill()
    killed_at = time.monotonic()
    run = wait_status(run_id, [Status.FAILED, Status.SUCCEEDED], 60)
    assert run.status == Status.FAILED
    assert "worker lost" in run.error
    assert time.monotonic() - killed_at < 60
    # Without its worker nobody would watch the training: it must not keep running.
    gone, alive = psutil.wait_procs(training, timeout=15)
    assert not alive, f"training survived its worker: {alive}"

    seen = Checkpoint.objects.filter(run_id=run_id).order_by("-step").first()
    workers["training"] = LiveWorker("training", workers["logs"], **workers["env"])
    response = api.post(f"/api/runs/{run_id}/resume/")
    assert response.status_code == 200, response.content
    # Resume first stores what the dead launch left unread: perhaps a later checkpoint.
    last = Checkpoint.objects.filter(run_id=run_id).order_by("-step").first()
    assert last.step >= seen.step and Run.objects.get(pk=run_id).resume_step == last.step
    run = wait_status(run_id, [Status.SUCCEEDED, Status.FAILED], 240, workers)
    assert run.status == Status.SUCCEEDED, run_info(run_id, workers)()
    assert run.step == 400 and run.attempts == 2
    assert f"resumed from step {last.step}" in (run.directory / "log.txt").read_text()
    steps = list(
        MetricPoint.objects.filter(run_id=run_id, name="train/loss").values_list("step", flat=True)
    )
    assert sorted(steps) == list(range(1, 401)), "each step recorded exactly once"


def test_stale_messages_for_unknown_or_finished_runs_are_ignored(workers):
    from runs.tasks import execute_run

    user = get_user_model().objects.create_user("carol")
    done = Run.objects.create(kind="base", owner=user, status=Status.SUCCEEDED)
    execute_run.apply_async(args=[done.pk, str(done.launch_token)])
    execute_run.apply_async(args=[10**9, "00000000-0000-0000-0000-000000000000"])
    wait_for(
        lambda: workers["training"].log().count("skipped") >= 2,
        30,
        "both messages",
        info=workers["training"].log,
    )
    done.refresh_from_db()
    assert done.status == Status.SUCCEEDED and done.attempts == 0
    assert workers["training"].proc.poll() is None  # and the worker is still serving
