"""Bad input to every write endpoint and every query parameter: a 4xx naming the field.

Each case states the field the answer must name; the answer is never a 500, and a refused
request writes nothing.
"""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from runs.models import ArtifactStatus, Dataset, Kind, Run, Status, Tokenizer

pytestmark = pytest.mark.django_db


@pytest.fixture
def inputs(ready_dataset, ready_tokenizer, make_dataset, make_tokenizer, alice):
    building = make_tokenizer(alice, ready_dataset, name="half", status=ArtifactStatus.BUILDING)
    return {
        "dataset": ready_dataset.pk,
        "tokenizer": ready_tokenizer.pk,
        "building_tokenizer": building.pk,
        "building_dataset": make_dataset(alice, name="wip", status=ArtifactStatus.BUILDING).pk,
    }


def base(inputs, **fields):
    return {"kind": "base", "preset": "tiny", "dataset": inputs["dataset"],
            "tokenizer": inputs["tokenizer"], **fields}  # fmt: skip


# (case, request body as a function of the inputs, the field the 400 must name)
RUN_CASES = [
    ("unknown kind", lambda i: {"kind": "fly"}, "kind"),
    ("kind created elsewhere", lambda i: {"kind": "dataset"}, "kind"),
    ("missing kind", lambda i: {"preset": "tiny"}, "kind"),
    ("unknown preset", lambda i: base(i, preset="huge"), "preset"),
    ("unknown config key", lambda i: base(i, config={"colour": 1}), "config.colour"),
    ("wrong type", lambda i: base(i, config={"depth": "deep"}), "config.depth"),
    ("out of range", lambda i: base(i, config={"depth": 0}), "config.depth"),
    ("path flag", lambda i: base(i, config={"run_dir": "/tmp/x"}), "config.run_dir"),
    ("batch arithmetic", lambda i: base(i, config={"total_batch_size": 1000}),
     "config.total_batch_size"),
    ("config is a list", lambda i: base(i, config=[1, 2]), "config"),
    ("config is a string", lambda i: base(i, config="depth=4"), "config"),
    ("config is null", lambda i: base(i, config=None), "config"),
    ("missing dataset", lambda i: base(i, dataset=None), "dataset"),
    ("dataset does not exist", lambda i: base(i, dataset=999999), "dataset"),
    ("dataset id not a number", lambda i: base(i, dataset="corpus"), "dataset"),
    ("missing tokenizer", lambda i: {"kind": "base", "dataset": i["dataset"]}, "tokenizer"),
    ("tokenizer not ready", lambda i: base(i, tokenizer=i["building_tokenizer"]), "tokenizer"),
    ("dataset not ready", lambda i: base(i, dataset=i["building_dataset"]), "dataset"),
    ("checkpoint does not exist", lambda i: base(i, parent_checkpoint=424242),
     "parent_checkpoint"),
    ("nproc 0", lambda i: base(i, nproc_per_node=0), "nproc_per_node"),
    ("nproc too many", lambda i: base(i, nproc_per_node=1000), "nproc_per_node"),
    ("nproc not a number", lambda i: base(i, nproc_per_node="two"), "nproc_per_node"),
    ("nproc for a one-process kind",
     lambda i: {"kind": "tokenizer", "dataset": i["dataset"], "nproc_per_node": 2},
     "nproc_per_node"),
    ("name too long", lambda i: base(i, name="x" * 201), "name"),
    ("duplicate tokenizer name", lambda i: {"kind": "tokenizer", "dataset": i["dataset"],
                                             "name": "tok512"}, "name"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "field"), RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_submission_names_the_bad_field(api, alice, inputs, case, body, field):
    response = api(alice).post("/api/runs/", body(inputs), format="json")
    assert response.status_code == 400, response.content
    errors = response.json()
    assert field in errors, errors
    assert all(isinstance(m, str) and m for m in errors[field])
    assert not Run.objects.exists()


def test_every_bad_field_is_named_at_once(api, alice, inputs):
    body = base(inputs, preset="huge", config={"depth": "deep", "colour": 1}, nproc_per_node=0)
    errors = api(alice).post("/api/runs/", body, format="json").json()
    assert {"preset", "config.depth", "config.colour", "nproc_per_node"} <= set(errors)


@pytest.mark.parametrize("url", ["/api/runs/", "/api/datasets/", "/api/tokenizers/"])
@pytest.mark.parametrize(
    ("body", "key"), [('{"kind": "base",', "detail"), ("[1, 2]", "non_field_errors")]
)
def test_malformed_or_non_object_json_is_a_400(api, alice, url, body, key):
    response = api(alice).post(url, body, content_type="application/json")
    assert response.status_code == 400
    assert key in response.json()


DATASET_CASES = [
    ("duplicate name", {"name": "corpus", "source": "builtin"}, "name"),
    ("name that is a path", {"name": "..", "source": "builtin"}, "name"),
    ("missing name", {"source": "builtin"}, "name"),
    ("bad source", {"name": "d", "source": "ftp"}, "source"),
    ("options not an object", {"name": "d", "source": "builtin", "options": [1]}, "options"),
    ("unknown option", {"name": "d", "source": "builtin", "options": {"colour": 1}},
     "options.colour"),
    ("wrong option type", {"name": "d", "source": "download", "options": {"workers": "many"}},
     "options.workers"),
    ("path option", {"name": "d", "source": "builtin", "options": {"out": "/etc"}},
     "options.out"),
    ("overwrite option", {"name": "d", "source": "builtin", "options": {"overwrite": True}},
     "options.overwrite"),
    ("upload without files", {"name": "d", "source": "upload"}, "files"),
    ("path without path", {"name": "d", "source": "path"}, "path"),
    ("path that is no directory", {"name": "d", "source": "path", "path": "/no/such/dir"},
     "path"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "body", "field"), DATASET_CASES, ids=[c[0] for c in DATASET_CASES]
)
def test_dataset_creation_names_the_bad_field(api, alice, ready_dataset, case, body, field):
    response = api(alice).post("/api/datasets/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert Dataset.objects.count() == 1 and not Run.objects.exists()


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"source": "upload"}, ["virus.exe"]),
        ({"source": "upload"}, ["notes.txt", "setup.exe"]),
        ({"source": "builtin"}, ["notes.txt"]),
        ({"source": "upload", "options": "not json"}, ["notes.txt"]),
    ],
)
def test_dataset_upload_refuses_bad_files_and_options(api, alice, fields, names):
    files = [SimpleUploadedFile(n, b"some text\n") for n in names]
    body = {"name": "up", **fields, "files": files}
    response = api(alice).post("/api/datasets/", body, format="multipart")
    assert response.status_code == 400, response.content
    field = "options" if "options" in fields else "files"
    assert field in response.json(), response.json()
    assert not Dataset.objects.exists()


TOKENIZER_CASES = [
    ("missing dataset", lambda i: {"config": {"vocab_size": 300}}, "dataset"),
    ("dataset does not exist", lambda i: {"dataset": 99999}, "dataset"),
    ("dataset not ready", lambda i: {"dataset": i["building_dataset"]}, "dataset"),
    ("vocab too small", lambda i: {"dataset": i["dataset"], "config": {"vocab_size": 10}},
     "config.vocab_size"),
    ("unknown setting", lambda i: {"dataset": i["dataset"], "config": {"colour": 1}},
     "config.colour"),
    ("path setting", lambda i: {"dataset": i["dataset"], "config": {"out": "/etc"}},
     "config.out"),
    ("config not an object", lambda i: {"dataset": i["dataset"], "config": 512}, "config"),
    ("duplicate name", lambda i: {"dataset": i["dataset"], "name": "tok512"}, "name"),
    ("name that is a path", lambda i: {"dataset": i["dataset"], "name": "."}, "name"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "body", "field"), TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES]
)
def test_tokenizer_creation_names_the_bad_field(api, alice, inputs, case, body, field):
    response = api(alice).post("/api/tokenizers/", body(inputs), format="json")
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert Tokenizer.objects.count() == 2 and not Run.objects.exists()


# ---- actions in the wrong state: 409 with a detail message --------------------------------


def test_actions_in_the_wrong_state_are_conflicts(api, alice, finished_run, make_run):
    client = api(alice)
    queued = make_run(alice, Status.QUEUED)
    failed_without_checkpoint = make_run(alice, Status.FAILED)
    tokenizer_run = make_run(alice, Status.FAILED, kind=Kind.TOKENIZER)
    cases = [
        ("post", f"/api/runs/{finished_run.pk}/cancel/"),
        ("post", f"/api/runs/{finished_run.pk}/resume/"),
        ("post", f"/api/runs/{failed_without_checkpoint.pk}/resume/"),
        ("post", f"/api/runs/{tokenizer_run.pk}/resume/"),
        ("post", f"/api/runs/{queued.pk}/retry/"),
        ("delete", f"/api/runs/{queued.pk}/"),
        ("delete", f"/api/datasets/{finished_run.dataset_id}/"),
        ("delete", f"/api/tokenizers/{finished_run.tokenizer_id}/"),
    ]
    for method, url in cases:
        response = getattr(client, method)(url)
        assert response.status_code == 409, (url, response.content)
        assert response.json()["detail"]
    assert Run.objects.get(pk=queued.pk).status == Status.QUEUED


def test_a_dataset_with_a_tokenizer_but_no_runs_is_not_deleted(
    api, alice, make_dataset, make_tokenizer
):
    dataset = make_dataset(alice, name="held")
    make_tokenizer(alice, dataset, name="held-tok")
    response = api(alice).delete(f"/api/datasets/{dataset.pk}/")
    assert response.status_code == 409
    assert Dataset.objects.filter(pk=dataset.pk).exists()


# ---- query parameters ---------------------------------------------------------------------

QUERY_CASES = [
    ("metrics/?max_points=1", "max_points"),
    ("metrics/?max_points=100001", "max_points"),
    ("metrics/?max_points=many", "max_points"),
    ("metrics/?after_step=later", "after_step"),
    ("log/?lines=0", "lines"),
    ("log/?lines=5001", "lines"),
    ("log/?lines=all", "lines"),
    ("events/?after=x", "after"),
    ("events/?limit=0", "limit"),
    ("events/?limit=5001", "limit"),
]


@pytest.mark.parametrize(("query", "field"), QUERY_CASES)
def test_bad_run_read_parameters_name_the_parameter(api, alice, finished_run, query, field):
    response = api(alice).get(f"/api/runs/{finished_run.pk}/{query}")
    assert response.status_code == 400, response.content
    assert field in response.json()


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/runs/?status=bogus", "status"),
        ("/api/runs/?kind=bogus", "kind"),
        ("/api/checkpoints/?run=abc", "run"),
        ("/api/checkpoints/?stage=zz", "stage"),
        ("/api/evals/?checkpoint=x", "checkpoint"),
        ("/api/reports/?run=x", "run"),
    ],
)
def test_bad_list_filters_name_the_parameter(api, alice, url, field):
    response = api(alice).get(url)
    assert response.status_code == 400, response.content
    assert field in response.json()


def test_unknown_objects_are_404(api, alice):
    client = api(alice)
    for url in ("/api/runs/999999/", "/api/runs/abc/", "/api/datasets/999/",
                "/api/runs/999999/metrics/"):  # fmt: skip
        assert client.get(url).status_code == 404, url
    assert client.post("/api/runs/999999/cancel/").status_code == 404


def test_errors_are_json_with_lists_of_messages(api, alice, inputs):
    response = api(alice).post("/api/runs/", base(inputs, config={"depth": "deep"}), format="json")
    assert response["Content-Type"] == "application/json"
    assert json.loads(response.content) == {"config.depth": ["must be an integer, got 'deep'"]}
