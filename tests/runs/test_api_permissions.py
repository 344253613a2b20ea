"""Who may do what: anonymous / another user / the owner / staff against every endpoint.

Everyone signed in reads everything and may create; only the owner or staff cancel, resume,
delete, or rebuild a dataset or tokenizer; anyone may retry a training run (it becomes their
own run). Anonymous requests are refused everywhere.
"""

import pytest

from runs.models import Kind, Run, Status
from tests.runs.conftest import PASSWORD, add_checkpoint

pytestmark = pytest.mark.django_db

ROLES = ("other", "owner", "staff")
READ = (200, 200, 200)
CREATE = (201, 201, 201)
MANAGE = (403, 200, 200)
MANAGE_DELETE = (403, 204, 204)
MANAGE_CREATE = (403, 201, 201)

# (method, path, body, expected status for other / owner / staff)
MATRIX = [
    ("get", "/api/programs/", None, READ),
    ("get", "/api/runs/", None, READ),
    ("post", "/api/runs/", "new_run", CREATE),
    ("get", "/api/runs/{finished}/", None, READ),
    ("delete", "/api/runs/{finished}/", None, MANAGE_DELETE),
    ("post", "/api/runs/{queued}/cancel/", None, MANAGE),
    ("post", "/api/runs/{failed}/resume/", None, MANAGE),
    ("post", "/api/runs/{finished}/retry/", None, CREATE),
    ("post", "/api/runs/{dataset_build}/retry/", None, MANAGE_CREATE),
    ("get", "/api/runs/{finished}/metrics/", None, READ),
    ("get", "/api/runs/{finished}/log/", None, READ),
    ("get", "/api/runs/{finished}/events/", None, READ),
    ("get", "/api/runs/{finished}/samples/", None, READ),
    ("get", "/api/runs/{finished}/report/", None, READ),
    ("get", "/api/datasets/", None, READ),
    ("post", "/api/datasets/", "new_dataset", CREATE),
    ("get", "/api/datasets/{spare_dataset}/", None, READ),
    ("delete", "/api/datasets/{spare_dataset}/", None, MANAGE_DELETE),
    ("get", "/api/tokenizers/", None, READ),
    ("post", "/api/tokenizers/", "new_tokenizer", CREATE),
    ("get", "/api/tokenizers/{spare_tokenizer}/", None, READ),
    ("delete", "/api/tokenizers/{spare_tokenizer}/", None, MANAGE_DELETE),
    ("get", "/api/checkpoints/", None, READ),
    ("get", "/api/checkpoints/{checkpoint}/", None, READ),
    ("get", "/api/evals/", None, READ),
    ("get", "/api/reports/", None, READ),
    ("get", "/api/reports/{report}/", None, READ),
]


@pytest.fixture
def world(alice, finished_run, make_run, make_dataset, make_tokenizer, ready_dataset):
    """alice's objects in every state the matrix needs, as {name: id} plus request bodies."""
    failed = make_run(alice, Status.FAILED)
    add_checkpoint(failed, 10)
    spare_dataset = make_dataset(alice, name="spare")
    dataset_build = make_run(alice, Status.SUCCEEDED, kind=Kind.DATASET, dataset=spare_dataset,
                             tokenizer=None, config={"command": "builtin"})  # fmt: skip
    spare_tokenizer = make_tokenizer(alice, ready_dataset, name="spare-tok")
    make_run(alice, Status.SUCCEEDED, kind=Kind.TOKENIZER, tokenizer=spare_tokenizer,
             config={"vocab_size": 512})  # fmt: skip
    return {
        "finished": finished_run.pk,
        "queued": make_run(alice, Status.QUEUED).pk,
        "failed": failed.pk,
        "dataset_build": dataset_build.pk,
        "spare_dataset": spare_dataset.pk,
        "spare_tokenizer": spare_tokenizer.pk,
        "checkpoint": finished_run.checkpoints.first().pk,
        "report": finished_run.reports.first().pk,
        "new_run": {
            "kind": "base",
            "preset": "tiny",
            "dataset": ready_dataset.pk,
            "tokenizer": finished_run.tokenizer_id,
        },
        "new_dataset": {"name": "fresh", "source": "builtin", "options": {"shards": 2}},
        "new_tokenizer": {"dataset": ready_dataset.pk, "config": {"vocab_size": 300}},
    }


def _request(client, method, path, body, world):
    return getattr(client, method)(
        path.format(**world), world[body] if body else None, format="json"
    )


@pytest.mark.parametrize(("method", "path", "body", "expected"), MATRIX)
@pytest.mark.parametrize("role", ROLES)
def test_signed_in_users(api, alice, bob, staff, world, role, method, path, body, expected):
    user = {"other": bob, "owner": alice, "staff": staff}[role]
    response = _request(api(user), method, path, body, world)
    assert response.status_code == expected[ROLES.index(role)], response.content


@pytest.mark.parametrize(("method", "path", "body", "expected"), MATRIX)
def test_anonymous_is_refused_and_changes_nothing(api, world, method, path, body, expected):
    runs_before = Run.objects.count()
    response = _request(api(), method, path, body, world)
    assert response.status_code in (401, 403), response.content
    assert Run.objects.count() == runs_before


@pytest.mark.parametrize(("method", "path", "body", "expected"), MATRIX)
def test_token_auth_works_like_session_auth(api, alice, world, method, path, body, expected):
    response = _request(api(alice, token=True), method, path, body, world)
    assert response.status_code == expected[ROLES.index("owner")], response.content


def test_a_token_is_obtained_with_username_and_password(api, alice):
    response = api().post("/api/auth/token/", {"username": "alice", "password": PASSWORD})
    assert response.status_code == 200
    client = api()
    client.credentials(HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    assert client.get("/api/runs/").status_code == 200
    wrong = api().post("/api/auth/token/", {"username": "alice", "password": "nope"})
    assert wrong.status_code == 400 and "non_field_errors" in wrong.json()


def test_refused_changes_leave_the_run_as_it_was(api, bob, world):
    client = api(bob)
    assert client.post(f"/api/runs/{world['queued']}/cancel/").status_code == 403
    assert client.delete(f"/api/runs/{world['finished']}/").status_code == 403
    assert Run.objects.get(pk=world["queued"]).status == Status.QUEUED
    assert Run.objects.filter(pk=world["finished"]).exists()


def test_retry_by_another_user_creates_their_own_run(api, bob, world):
    response = api(bob).post(f"/api/runs/{world['finished']}/retry/")
    assert response.status_code == 201
    data = response.json()
    assert data["id"] != world["finished"] and data["owner"] == "bob"
    assert data["status"] == "queued" and data["can_manage"] is True
