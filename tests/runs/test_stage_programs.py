"""The later stages and the pipeline as run kinds: inputs, checks and the command lines."""

from __future__ import annotations

import pytest
from django.urls import reverse

from runs import services
from runs.models import Checkpoint, Kind, Run, Status
from runs.programs import PROGRAMS
from tests.runs.conftest import add_checkpoint
from training.flags import ConfigError

pytestmark = pytest.mark.django_db


@pytest.fixture
def base_checkpoint(alice, make_run):
    return add_checkpoint(make_run(alice, Status.SUCCEEDED), 20)


def submit(user, kind, django_capture_on_commit_callbacks, **kwargs) -> Run:
    with django_capture_on_commit_callbacks():
        return services.submit_run(user, kind, **kwargs)


@pytest.mark.parametrize("kind,module", [("sft", "training.chat_sft"),
                                         ("mid", "training.mid_train")])  # fmt: skip
def test_finetune_runs_start_from_their_parent_checkpoint(alice, base_checkpoint, kind, module,
                                                          django_capture_on_commit_callbacks):  # fmt: skip
    run = submit(alice, kind, django_capture_on_commit_callbacks, preset="tiny",
                 parent_checkpoint=base_checkpoint)  # fmt: skip
    [argv] = PROGRAMS[kind].commands(run)
    assert argv[argv.index("-m", 3) + 1] == module
    assert argv[argv.index("--source-dir") + 1] == base_checkpoint.path
    assert argv[argv.index("--source-step") + 1] == "20"
    assert argv[argv.index("--checkpoint-dir") + 1].startswith(run.run_dir)
    assert argv.count("--source-step") == 1  # the app's, not a user setting


def test_stage_kinds_need_a_parent_checkpoint_of_the_right_stage(alice, base_checkpoint):
    with pytest.raises(ConfigError) as error:
        services.submit_run(alice, "sft", preset="tiny")
    assert "parent_checkpoint" in error.value.errors
    with pytest.raises(ConfigError) as error:
        services.submit_run(alice, "rl", preset="tiny", parent_checkpoint=base_checkpoint)
    assert "is a base checkpoint" in error.value.errors["parent_checkpoint"]
    assert not Run.objects.filter(kind__in=["sft", "rl"]).exists()


def test_evaluations_read_the_parent_checkpoint(alice, base_checkpoint,
                                                django_capture_on_commit_callbacks):  # fmt: skip
    run = submit(alice, "base_eval", django_capture_on_commit_callbacks, preset="tiny",
                 parent_checkpoint=base_checkpoint)  # fmt: skip
    [argv] = PROGRAMS["base_eval"].commands(run)
    assert argv[argv.index("--checkpoint-dir") + 1] == base_checkpoint.path
    assert argv[argv.index("--data-dir") + 1] == base_checkpoint.run.dataset.path
    sft = Checkpoint.objects.create(run=base_checkpoint.run, stage="sft", step=3, path="/x/sft")
    run = submit(alice, "chat_eval", django_capture_on_commit_callbacks, preset="tiny",
                 parent_checkpoint=sft, config={"tasks": "spelling_bee"})  # fmt: skip
    [argv] = PROGRAMS["chat_eval"].commands(run)
    assert argv[argv.index("--checkpoint-dir") + 1] == "/x/sft"
    assert argv[argv.index("--step") + 1] == "3"
    assert argv[argv.index("--tasks") + 1] == "spelling_bee"


def test_pipeline_run_writes_under_its_own_directory(alice, api,
                                                     django_capture_on_commit_callbacks):  # fmt: skip
    with django_capture_on_commit_callbacks():
        response = api(alice).post("/api/runs/", {"kind": "pipeline", "preset": "tiny",
                                                  "config": {"rl": True}}, format="json")  # fmt: skip
    assert response.status_code == 201, response.content
    run = Run.objects.get(pk=response.json()["id"])
    [argv] = PROGRAMS["pipeline"].commands(run)
    assert argv[:3][-1] == "training.pipeline" or "training.pipeline" in argv
    assert argv[argv.index("--out-dir") + 1] == f"{run.run_dir}/out"
    assert argv[argv.index("--run-dir") + 1] == run.run_dir
    assert "--rl" in argv


def test_pipeline_settings_are_validated(alice, api):
    response = api(alice).post("/api/runs/", {"kind": "pipeline", "config": {
        "nproc_per_node": 0, "out_dir": "/etc"}}, format="json")  # fmt: skip
    assert response.status_code == 400
    errors = response.json()
    assert "config.nproc_per_node" in str(errors) and "config.out_dir" in str(errors)


def test_quick_start_launches_the_demo_pipeline(client, alice, settings,
                                                django_capture_on_commit_callbacks):  # fmt: skip
    settings.RUNS_QUICKSTART_PRESET = "tiny"
    client.force_login(alice)
    assert 'id="quick-start"' in client.get(reverse("home")).content.decode()
    with django_capture_on_commit_callbacks():
        response = client.post(reverse("quick-start"))
    run = Run.objects.get(kind=Kind.PIPELINE)
    assert run.preset == "tiny" and run.owner == alice and run.status == Status.QUEUED
    assert response["Location"] == reverse("run-detail", args=[run.pk]) + "?then=chat"
    assert client.get(reverse("quick-start")).status_code == 405
