"""Writing through the API: what each accepted request leaves in the database.

Queued runs stay queued here: in `db` tests the transaction never commits, so the Celery
message (sent on commit) is never sent and no worker is needed.
"""

import json
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from runs.models import ArtifactStatus, Dataset, Kind, Run, Status, Tokenizer
from tests.runs.conftest import add_checkpoint

pytestmark = pytest.mark.django_db


def test_submit_queues_a_run_with_preset_overrides_and_inputs(
    api, alice, ready_dataset, ready_tokenizer
):
    body = {
        "kind": "base", "preset": "tiny", "config": {"depth": 3, "num_iterations": "30"},
        "dataset": ready_dataset.pk, "tokenizer": ready_tokenizer.pk, "name": "my run",
    }  # fmt: skip
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    run = Run.objects.get(pk=data["id"])
    assert (run.owner, run.status, run.kind, run.name) == (alice, Status.QUEUED, "base", "my run")
    assert run.overrides == {"depth": 3, "num_iterations": "30"}
    assert run.config["depth"] == 3 and run.config["num_iterations"] == 30
    assert run.config["max_seq_len"] == 64  # from the preset
    assert Path(run.run_dir).is_dir()
    assert data["status"] == "queued" and data["config"]["depth"] == 3
    assert data["can_manage"] is True


def test_create_builtin_dataset_returns_it_with_its_build_run(api, alice):
    body = {"name": "stdlib", "source": "builtin", "options": {"shards": 4}}
    response = api(alice).post("/api/datasets/", body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["name"] == "stdlib" and data["status"] == "building" and data["owner"] == "alice"
    run = Run.objects.get(pk=data["run"])
    assert run.kind == Kind.DATASET and run.dataset_id == data["id"]
    assert run.config["command"] == "builtin" and run.config["shards"] == 4


def test_upload_dataset_saves_the_files_for_the_build_run(api, alice):
    files = [SimpleUploadedFile("a.txt", b"first doc\n"), SimpleUploadedFile("b.jsonl", b"{}\n")]
    body = {"name": "mine", "source": "upload", "options": json.dumps({"shards": 2}),
            "files": files}  # fmt: skip
    response = api(alice).post("/api/datasets/", body, format="multipart")
    assert response.status_code == 201, response.content
    run = Run.objects.get(pk=response.json()["run"])
    saved = [Path(p) for p in run.config["files"]]
    assert [p.name for p in saved] == ["file-000.txt", "file-001.jsonl"]
    assert saved[0].read_bytes() == b"first doc\n"
    assert run.config["command"] == "import" and run.config["shards"] == 2


def test_create_tokenizer_returns_it_with_its_build_run(api, alice, ready_dataset):
    body = {"name": "tok300", "dataset": ready_dataset.pk, "config": {"vocab_size": 300}}
    response = api(alice).post("/api/tokenizers/", body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["name"] == "tok300" and data["vocab_size"] == 300
    assert data["dataset"] == {"id": ready_dataset.pk, "name": "corpus"}
    assert data["status"] == "building"
    run = Run.objects.get(pk=data["run"])
    assert run.kind == Kind.TOKENIZER and run.tokenizer_id == data["id"]


def test_cancel_a_queued_run_ends_it_and_a_running_one_is_asked_to_stop(api, alice, make_run):
    queued, running = make_run(alice, Status.QUEUED), make_run(alice, Status.RUNNING)
    client = api(alice)
    assert client.post(f"/api/runs/{queued.pk}/cancel/").json()["status"] == "cancelled"
    data = client.post(f"/api/runs/{running.pk}/cancel/").json()
    assert data["status"] == "running" and data["cancel_requested"] is True


def test_resume_requeues_from_the_last_checkpoint(api, alice, make_run):
    run = make_run(alice, Status.FAILED, error="killed")
    add_checkpoint(run, 10)
    add_checkpoint(run, 20)
    data = api(alice).post(f"/api/runs/{run.pk}/resume/").json()
    assert data["id"] == run.pk and data["status"] == "queued"
    assert data["resume_step"] == 20 and data["error"] == ""


def test_retry_of_a_dataset_run_rebuilds_it_in_place(api, alice, make_dataset, make_run):
    dataset = make_dataset(alice, name="broken", status=ArtifactStatus.FAILED)
    build = make_run(alice, Status.FAILED, kind=Kind.DATASET, dataset=dataset, tokenizer=None,
                     config={"command": "builtin"})  # fmt: skip
    response = api(alice).post(f"/api/runs/{build.pk}/retry/")
    assert response.status_code == 201
    assert response.json()["id"] == build.pk and response.json()["status"] == "queued"
    assert Dataset.objects.get(pk=dataset.pk).status == ArtifactStatus.BUILDING


def test_delete_run_removes_it_and_its_rows(api, alice, finished_run):
    assert api(alice).delete(f"/api/runs/{finished_run.pk}/").status_code == 204
    assert not Run.objects.filter(pk=finished_run.pk).exists()


def test_delete_dataset_and_tokenizer_remove_their_build_runs(
    api, staff, alice, make_dataset, make_tokenizer, make_run
):
    dataset = make_dataset(alice, name="spare")
    dataset_run = make_run(alice, Status.SUCCEEDED, kind=Kind.DATASET, dataset=dataset,
                           tokenizer=None)  # fmt: skip
    tokenizer = make_tokenizer(alice, dataset, name="spare-tok")
    tokenizer_run = make_run(alice, Status.SUCCEEDED, kind=Kind.TOKENIZER, dataset=dataset,
                             tokenizer=tokenizer)  # fmt: skip
    client = api(staff)
    assert client.delete(f"/api/datasets/{dataset.pk}/").status_code == 409  # tokenizer uses it
    assert client.delete(f"/api/tokenizers/{tokenizer.pk}/").status_code == 204
    assert not Tokenizer.objects.filter(pk=tokenizer.pk).exists()
    assert not Run.objects.filter(pk=tokenizer_run.pk).exists()
    assert client.delete(f"/api/datasets/{dataset.pk}/").status_code == 204
    assert not Dataset.objects.filter(pk=dataset.pk).exists()
    assert not Run.objects.filter(pk=dataset_run.pk).exists()


def test_delete_a_dataset_without_a_build_run(api, alice, make_dataset):
    dataset = make_dataset(alice, name="orphan")
    assert api(alice).delete(f"/api/datasets/{dataset.pk}/").status_code == 204
    assert not Dataset.objects.filter(pk=dataset.pk).exists()
