"""Issue 13, "names that are paths" and "model_tag traversal": paths are made, never given.

Each test is a reproduction from the probe, through the real API as a non-staff user, that now
ends safely: the request is refused with the field named, directories come from ids, and
deleting an artifact or a run removes its own directory and nothing else.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from runs import ingest, layout
from runs.models import Checkpoint, Dataset, Kind, Run, Status, Tokenizer
from training import base_train, pipeline
from training.checkpoints import resolve_output

pytestmark = pytest.mark.django_db

TRAVERSALS = ["../../../run-000001/out/sft_checkpoints/d2", "../../../../../../x", "..", "a/b"]


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---- 1. names are display names; directories come from ids --------------------------------


@pytest.mark.parametrize("name", [".", "..", " .. ", "bad\x01name", "x" * 101, ""])
def test_a_dataset_name_that_is_a_path_or_not_text_is_refused(api, alice, name):
    body = {"name": name, "source": "builtin"}
    response = api(alice).post("/api/datasets/", body, format="json")
    assert response.status_code == 400, response.content
    assert "name" in response.json()
    assert not Dataset.objects.exists() and not Run.objects.exists()


def test_a_dataset_builds_into_its_id_directory_whatever_its_name(api, alice):
    response = api(alice).post(
        "/api/datasets/", {"name": "../../x/ my data", "source": "builtin"}, format="json"
    )
    assert response.status_code == 201, response.content
    dataset = Dataset.objects.get(pk=response.json()["id"])
    assert dataset.name == "../../x/ my data"
    assert Path(dataset.path) == layout.data_home() / "datasets" / f"dataset-{dataset.pk:06d}"
    build = Run.objects.get(pk=response.json()["run"])
    command = build.config["command"]
    assert command == "builtin"
    assert Path(build.run_dir) == layout.run_dir(build.pk)


@pytest.mark.parametrize("name", [".", "..", "tab\there"])
def test_a_tokenizer_name_that_is_a_path_is_refused(api, alice, ready_dataset, name):
    body = {"name": name, "dataset": ready_dataset.pk, "config": {"vocab_size": 300}}
    response = api(alice).post("/api/tokenizers/", body, format="json")
    assert response.status_code == 400, response.content
    assert "name" in response.json()
    assert not Tokenizer.objects.exists()


def test_a_tokenizer_gets_its_id_directory(api, alice, ready_dataset):
    body = {"name": "../tok", "dataset": ready_dataset.pk, "config": {"vocab_size": 300}}
    response = api(alice).post("/api/tokenizers/", body, format="json")
    assert response.status_code == 201, response.content
    tokenizer = Tokenizer.objects.get(pk=response.json()["id"])
    assert Run.objects.get(pk=response.json()["run"]).tokenizer == tokenizer
    assert tokenizer.name == "../tok"
    assert Path(tokenizer.path) == layout.tokenizer_dir(tokenizer.pk)


def test_upload_names_never_reach_the_file_system(api, alice):
    files = [SimpleUploadedFile("../../../escape.txt", b"doc\n")]
    body = {"name": "up", "source": "upload", "files": files}
    response = api(alice).post("/api/datasets/", body, format="multipart")
    assert response.status_code == 201, response.content
    build = Run.objects.get(pk=response.json()["run"])
    (saved,) = [Path(p) for p in build.config["files"]]
    assert saved == Path(build.run_dir) / "uploads" / "file-000.txt"
    assert saved.read_bytes() == b"doc\n"
    assert not (Path(build.run_dir).parent.parent / "escape.txt").exists()


# ---- 2. model_tag and other values that reach a path ---------------------------------------


@pytest.mark.parametrize("tag", TRAVERSALS)
def test_a_pipeline_model_tag_that_leaves_its_folder_is_refused(api, alice, tag):
    body = {"kind": "pipeline", "preset": "demo-cpu", "config": {"model_tag": tag}}
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 400, response.content
    assert "config.model_tag" in response.json()
    assert not Run.objects.exists()


def test_a_base_model_tag_that_leaves_its_folder_is_refused(
    api, alice, ready_dataset, ready_tokenizer
):
    body = {
        "kind": "base", "preset": "tiny", "config": {"model_tag": "../../x"},
        "dataset": ready_dataset.pk, "tokenizer": ready_tokenizer.pk,
    }  # fmt: skip
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 400, response.content
    assert "config.model_tag" in response.json()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sft_args", "--checkpoint-dir /tmp/elsewhere"),
        ("base_args", "--checkpoint=/tmp/elsewhere"),  # argparse takes abbreviations
        ("chat_eval_args", "--config /etc/passwd"),
        ("base_eval_args", "--run-dir /tmp/x"),
        ("base_preset", "../../../etc/passwd"),
    ],
)
def test_pipeline_options_cannot_name_paths(api, alice, field, value):
    body = {"kind": "pipeline", "preset": "demo-cpu", "config": {field: value}}
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 400, response.content
    assert f"config.{field}" in response.json()


def test_default_tags_still_make_their_folders(tmp_path):
    paths = base_train.resolve_paths({**base_train.FLAGS.defaults(), "depth": 4})
    assert paths["checkpoint_dir"].parts[-2:] == ("base_checkpoints", "d4")
    source = tmp_path / "base_checkpoints" / "d4"
    tag, target = resolve_output({"model_tag": "", "checkpoint_dir": ""}, "sft_checkpoints", source)
    assert tag == "d4" and target.parts[-2:] == ("sft_checkpoints", "d4")


def test_a_safe_model_tag_is_accepted(api, alice):
    body = {"kind": "pipeline", "preset": "demo-cpu", "config": {"model_tag": "my-model.v2"}}
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 201, response.content


@pytest.mark.parametrize("tag", TRAVERSALS)
def test_the_programs_refuse_a_traversing_tag_from_the_command_line_too(tag, tmp_path):
    with pytest.raises(ValueError, match="model_tag"):
        resolve_output({"model_tag": tag, "checkpoint_dir": ""}, "sft_checkpoints", tmp_path)
    with pytest.raises(SystemExit):
        base_train.FLAGS.parse(["--model-tag", tag])
    with pytest.raises(ValueError):  # a config that skipped validation
        base_train.resolve_paths({**base_train.FLAGS.defaults(), "model_tag": tag})
    config = {**pipeline.FLAGS.defaults(), "out_dir": str(tmp_path)}
    config["model_tag"] = tag  # as if validation had been skipped
    with pytest.raises(ValueError):
        pipeline.plan(config)


# ---- deleting removes only what the row owns ----------------------------------------------


@pytest.fixture
def bobs_dataset(bob):
    """bob's dataset in its id directory, with a shard in it."""
    dataset = Dataset.objects.create(name="bobs", owner=bob, source="builtin")
    dataset.path = str(layout.dataset_dir(dataset.pk))
    dataset.save()
    Path(dataset.path).mkdir(parents=True)
    (Path(dataset.path) / "shard_00000.parquet").write_bytes(b"bob's data")
    yield dataset
    shutil.rmtree(dataset.path, ignore_errors=True)


def _delete(api, user, url, capture):
    with capture(execute=True):
        return api(user).delete(url)


def test_deleting_my_dataset_removes_my_directory_only(
    api, alice, bobs_dataset, django_capture_on_commit_callbacks
):
    response = api(alice).post("/api/datasets/", {"name": "mine", "source": "builtin"})
    mine = Dataset.objects.get(pk=response.json()["id"])
    build = Run.objects.get(pk=response.json()["run"])
    Run.objects.filter(pk=build.pk).update(status=Status.SUCCEEDED)
    Path(mine.path).mkdir(parents=True)
    (Path(mine.path) / "shard_00000.parquet").write_bytes(b"alice's data")
    home = layout.data_home()
    before = _listing(home)

    url = f"/api/datasets/{mine.pk}/"
    assert _delete(api, alice, url, django_capture_on_commit_callbacks).status_code == 204
    assert not Path(mine.path).exists() and not Path(build.run_dir).exists()
    assert (Path(bobs_dataset.path) / "shard_00000.parquet").read_bytes() == b"bob's data"
    gone = {home / p for p in before - _listing(home)}
    assert all(
        p in (Path(mine.path), Path(build.run_dir))
        or p.parent in (Path(mine.path), Path(build.run_dir))
        or layout.inside(p, build.run_dir)
        for p in gone
    )


@pytest.mark.parametrize(
    "target",
    [
        lambda bobs: layout.data_home() / "datasets",  # what a dataset named "." built into
        lambda bobs: layout.data_home(),  # ".."
        lambda bobs: Path(bobs.path),  # someone else's directory
        lambda bobs: layout.data_home() / "datasets" / "x" / ".." / Path(bobs.path).name,
    ],
    ids=["datasets folder", "data home", "another row's directory", "a path through .."],
)
def test_a_row_pointing_elsewhere_deletes_nothing_but_itself(
    api, alice, bobs_dataset, target, django_capture_on_commit_callbacks
):
    # A row made before names stopped being paths, or tampered with: its path is not its own.
    row = Dataset.objects.create(name="legacy", owner=alice, source="builtin",
                                 path=str(target(bobs_dataset)))  # fmt: skip
    url = f"/api/datasets/{row.pk}/"
    assert _delete(api, alice, url, django_capture_on_commit_callbacks).status_code == 204
    assert not Dataset.objects.filter(pk=row.pk).exists()
    assert (Path(bobs_dataset.path) / "shard_00000.parquet").read_bytes() == b"bob's data"
    assert Dataset.objects.filter(pk=bobs_dataset.pk).exists()


def test_a_legacy_name_directory_is_still_deleted_with_its_row(
    api, alice, make_dataset, django_capture_on_commit_callbacks
):
    row = make_dataset(alice, name="old-style")  # path datasets/<name>, as before 0003
    Path(row.path).mkdir(parents=True)
    url = f"/api/datasets/{row.pk}/"
    assert _delete(api, alice, url, django_capture_on_commit_callbacks).status_code == 204
    assert not Path(row.path).exists()
    assert (layout.data_home() / "datasets").is_dir()


def test_a_tokenizer_pointing_at_the_tokenizers_folder_deletes_nothing_else(
    api, alice, ready_dataset, django_capture_on_commit_callbacks
):
    folder = layout.data_home() / "tokenizers"
    other = folder / "tokenizer-999999"
    other.mkdir(parents=True)
    row = Tokenizer.objects.create(name=".", owner=alice, dataset=ready_dataset, vocab_size=300,
                                   path=str(folder))  # fmt: skip
    url = f"/api/tokenizers/{row.pk}/"
    assert _delete(api, alice, url, django_capture_on_commit_callbacks).status_code == 204
    assert other.is_dir()
    other.rmdir()


def test_a_run_whose_directory_is_not_its_own_keeps_it(
    api, alice, bob, django_capture_on_commit_callbacks
):
    bobs_run = Run.objects.create(kind=Kind.BASE, owner=bob, status=Status.SUCCEEDED)
    bobs_dir = layout.run_dir(bobs_run.pk)
    bobs_dir.mkdir(parents=True)
    pipeline_run = Run.objects.create(kind=Kind.PIPELINE, owner=alice, status=Status.SUCCEEDED)
    # A stage run's directory comes from the pipeline's event file: one naming bob's run.
    stage = Run.objects.create(kind=Kind.BASE, owner=alice, status=Status.SUCCEEDED,
                               pipeline=pipeline_run, run_dir=str(bobs_dir))  # fmt: skip
    url = f"/api/runs/{stage.pk}/"
    assert _delete(api, alice, url, django_capture_on_commit_callbacks).status_code == 204
    assert bobs_dir.is_dir()
    bobs_dir.rmdir()


# ---- forged checkpoint events --------------------------------------------------------------


def test_a_checkpoint_event_outside_the_run_is_not_recorded(alice, bob, tmp_path):
    run = Run.objects.create(kind=Kind.SFT, owner=alice, status=Status.RUNNING)
    run.run_dir = str(layout.run_dir(run.pk))
    run.save()
    events = [
        {"type": "checkpoint", "time": 1.0, "step": 1, "path": str(tmp_path / "x")},
        {"type": "checkpoint", "time": 1.0, "step": 2,
         "path": f"{run.run_dir}/checkpoints/../../run-999999/checkpoints"},
        {"type": "checkpoint", "time": 1.0, "step": 3, "path": f"{run.run_dir}/checkpoints"},
        {"type": "eval_result", "time": 2.0, "task": "t", "value": 1.0},
    ]  # fmt: skip
    created = ingest.apply(run, ingest.parse_events(events), offset=10)
    assert [c.step for c in created] == [3]
    assert list(Checkpoint.objects.values_list("step", flat=True)) == [3]


def test_a_pipeline_stage_records_checkpoints_under_its_pipeline(alice):
    parent = Run.objects.create(kind=Kind.PIPELINE, owner=alice, status=Status.RUNNING)
    parent.run_dir = str(layout.run_dir(parent.pk))
    parent.save()
    stage = Run.objects.create(kind=Kind.SFT, owner=alice, pipeline=parent,
                               run_dir=f"{parent.run_dir}/stages/05-sft")  # fmt: skip
    path = os.path.join(parent.run_dir, "out", "sft_checkpoints", "d4")
    event = {"type": "checkpoint", "time": 1.0, "step": 7, "path": path}
    (created,) = ingest.apply(stage, ingest.parse_events([event]), offset=10)
    assert created.path == path


# ---- the migration ------------------------------------------------------------------------


def test_the_migration_renames_names_that_were_paths_and_keeps_paths(alice, ready_dataset):
    from django.apps import apps

    migration = importlib.import_module("runs.migrations.0003_names_are_not_paths")
    old_path = os.path.join(layout.data_home(), "datasets", ".")
    dot = Dataset.objects.create(name=".", owner=alice, source="builtin", path=old_path)
    migration.rename_unusable(apps, None)
    dot.refresh_from_db()
    assert (dot.name, dot.path) == (f"dataset-{dot.pk}", old_path)
    ready_dataset.refresh_from_db()
    assert ready_dataset.name == "corpus"  # a usable name stays as it was


# ---- task mixtures name files: only inside the data home -------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "smoltalk,customjson:/etc/passwd",
        "customjson:/etc/hosts.jsonl",  # outside the data home whatever its suffix
        "customjson:{home}/secret_key",  # inside, but not a JSONL file
        "customjson:{home}/datasets/../../../../etc/x.jsonl",
    ],
)
def test_an_sft_mixture_cannot_read_server_files(api, alice, finished_run, settings, spec):
    spec = spec.replace("{home}", str(settings.NANOCHAT_HOME))
    body = {"kind": "sft", "parent_checkpoint": finished_run.checkpoints.first().pk,
            "config": {"mixture": spec}}  # fmt: skip
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 400, response.content
    assert "customjson files must be .jsonl files inside" in response.json()["config.mixture"][0]
    assert not Run.objects.filter(kind="sft").exists()


def test_a_pipeline_stage_mixture_cannot_read_server_files(api, alice):
    body = {"kind": "pipeline", "preset": "demo-cpu",
            "config": {"sft_args": "--mixture customjson:/etc/passwd"}}  # fmt: skip
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 400, response.content
    assert "mixture: customjson files must be" in response.json()["config.sft_args"][0]


def test_a_mixture_file_in_the_data_home_is_accepted(api, alice, finished_run, settings):
    path = Path(settings.NANOCHAT_HOME) / "datasets" / "mine.jsonl"
    body = {"kind": "sft", "parent_checkpoint": finished_run.checkpoints.first().pk,
            "config": {"mixture": f"smoltalk,customjson:{path}*2"}}  # fmt: skip
    response = api(alice).post("/api/runs/", body, format="json")
    assert response.status_code == 201, response.content
