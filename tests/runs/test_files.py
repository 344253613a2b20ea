"""GET /runs/<id>/files/<name>: a run's log and event file, for signed-in users only."""

import pytest
from django.urls import reverse

from runs.models import Kind, Run

pytestmark = pytest.mark.django_db


@pytest.fixture
def run(tmp_path):
    (tmp_path / "log.txt").write_text("step 1 loss 4.2\nstep 2 loss 3.9\n")
    (tmp_path / "events.jsonl").write_text('{"type": "start", "time": 1.0}\n')
    (tmp_path / "secret.txt").write_text("not for the browser")
    return Run.objects.create(kind=Kind.BASE, run_dir=str(tmp_path))


@pytest.fixture
def signed_in(client, django_user_model):
    user = django_user_model.objects.create_user("reader", password="pw-for-tests")
    client.force_login(user)
    return client


def file_url(run_id: int, name: str) -> str:
    return reverse("run-file", args=[run_id, name])


def test_anonymous_is_sent_to_login(client, run):
    response = client.get(file_url(run.pk, "log.txt"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_log_is_served_inline_as_text(signed_in, run):
    response = signed_in.get(file_url(run.pk, "log.txt"))
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Content-Disposition"].startswith("inline")
    assert b"".join(response.streaming_content) == b"step 1 loss 4.2\nstep 2 loss 3.9\n"


def test_event_file_is_served(signed_in, run):
    response = signed_in.get(file_url(run.pk, "events.jsonl"))
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b'{"type": "start", "time": 1.0}\n'


def test_any_signed_in_user_may_read_another_users_run(signed_in, run, django_user_model):
    run.owner = django_user_model.objects.create_user("owner", password="pw-for-tests")
    run.save()
    assert signed_in.get(file_url(run.pk, "log.txt")).status_code == 200


@pytest.mark.parametrize("name", ["secret.txt", "..", "db.sqlite3", "log.txt.bak"])
def test_names_outside_the_allow_list_are_not_found(signed_in, run, name):
    assert signed_in.get(file_url(run.pk, name)).status_code == 404


def test_path_traversal_does_not_resolve(signed_in, run):
    response = signed_in.get(f"/runs/{run.pk}/files/../../etc/passwd")
    assert response.status_code == 404


def test_missing_file_is_not_found(signed_in, run, tmp_path):
    (tmp_path / "log.txt").unlink()
    assert signed_in.get(file_url(run.pk, "log.txt")).status_code == 404


def test_unknown_run_is_not_found(signed_in, run):
    assert signed_in.get(file_url(run.pk + 1000, "log.txt")).status_code == 404


def test_run_without_directory_is_not_found(signed_in):
    run = Run.objects.create(kind=Kind.BASE)
    assert signed_in.get(file_url(run.pk, "log.txt")).status_code == 404


def test_post_is_not_allowed(signed_in, run):
    assert signed_in.post(file_url(run.pk, "log.txt")).status_code == 405
