"""Tags and notes on runs (issue 18): the owner edits them on the run page and through the API,
they are normalized and bounded the same way in both, others are refused, and the runs list,
the API, the compare page and the leaderboard filter by tag; the note is shown escaped."""

from __future__ import annotations

import pytest
from django.urls import reverse

from runs.models import EvalResult, Status
from runs.tags import MAX_TAGS, NOTE_MAX_LENGTH, TAG_MAX_LENGTH
from tests.runs.conftest import add_checkpoint

pytestmark = pytest.mark.django_db


def tag_names(run) -> list[str]:
    return sorted(run.tags.values_list("name", flat=True))


def test_owner_edits_tags_and_note_on_the_run_page(client, alice, make_run):
    run = make_run(alice, Status.SUCCEEDED)
    client.force_login(alice)
    page = client.get(reverse("run-detail", args=[run.pk])).content.decode()
    assert 'id="save-run-notes"' in page
    url = reverse("run-notes", args=[run.pk])
    reply = client.post(url, {"tags": " Baseline, sweep:LR ,baseline,, ", "note": "# Why\nlr 3e-4"})
    assert reply.status_code == 302
    run.refresh_from_db()
    assert tag_names(run) == ["baseline", "sweep:lr"]
    assert run.note == "# Why\nlr 3e-4"
    page = client.get(reverse("run-detail", args=[run.pk])).content.decode()
    assert 'href="/runs/?tag=sweep%3Alr">sweep:lr</a>' in page
    # A bad tag changes nothing and says why, next to neither field silently dropped.
    reply = client.post(url, {"tags": "ok, no<html>", "note": "changed"}, follow=True)
    assert "may hold only letters" in reply.content.decode()
    run.refresh_from_db()
    assert tag_names(run) == ["baseline", "sweep:lr"] and run.note == "# Why\nlr 3e-4"


def test_note_is_rendered_escaped_with_line_breaks(client, alice, make_run):
    run = make_run(alice, Status.SUCCEEDED, note="<script>alert(1)</script>\nsecond line")
    client.force_login(alice)
    page = client.get(reverse("run-detail", args=[run.pk])).content.decode()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;<br>second line" in page


def test_others_may_not_edit_tags_or_note(client, api, alice, bob, make_run):
    run = make_run(alice, Status.SUCCEEDED)
    client.force_login(bob)
    page = client.get(reverse("run-detail", args=[run.pk])).content.decode()
    assert 'id="save-run-notes"' not in page
    client.post(reverse("run-notes", args=[run.pk]), {"tags": "mine", "note": "bob was here"})
    reply = api(bob).patch(f"/api/runs/{run.pk}/", {"tags": ["mine"]}, format="json")
    assert reply.status_code == 403
    run.refresh_from_db()
    assert tag_names(run) == [] and run.note == ""
    assert api(bob).patch("/api/runs/999999/", {"note": "x"}, format="json").status_code == 404
    assert api().patch(f"/api/runs/{run.pk}/", {"note": "x"}, format="json").status_code in (
        401,
        403,
    )


def test_owner_and_staff_edit_through_the_api(api, alice, staff, make_run):
    run = make_run(alice, Status.SUCCEEDED)
    reply = api(alice, token=True).patch(
        f"/api/runs/{run.pk}/", {"tags": [" Ablation ", "d12"], "note": "**bold**"}, format="json"
    )
    assert reply.status_code == 200, reply.content
    assert reply.json()["tags"] == ["ablation", "d12"] and reply.json()["note"] == "**bold**"
    # A field left out stays; staff may edit anyone's run.
    reply = api(staff).patch(f"/api/runs/{run.pk}/", {"note": ""}, format="json")
    assert reply.status_code == 200
    run.refresh_from_db()
    assert tag_names(run) == ["ablation", "d12"] and run.note == ""


@pytest.mark.parametrize(
    "body,field",
    [
        ({"tags": ["x" * (TAG_MAX_LENGTH + 1)]}, "tags"),
        ({"tags": ["semi;colon"]}, "tags"),
        ({"tags": [f"t{i}" for i in range(MAX_TAGS + 1)]}, "tags"),
        ({"tags": "not a list"}, "tags"),
        ({"note": "n" * (NOTE_MAX_LENGTH + 1)}, "note"),
        ({"note": ["not", "text"]}, "note"),
    ],
)
def test_bad_tags_or_note_are_a_400_naming_the_field(api, alice, make_run, body, field):
    run = make_run(alice, Status.SUCCEEDED)
    reply = api(alice).patch(f"/api/runs/{run.pk}/", body, format="json")
    assert reply.status_code == 400
    assert list(reply.json()) == [field]


def test_bounds_are_inclusive(api, alice, make_run):
    run = make_run(alice, Status.SUCCEEDED)
    tags = [f"t{i}" for i in range(MAX_TAGS - 1)] + ["x" * TAG_MAX_LENGTH]
    body = {"tags": tags + ["T0"], "note": "n" * NOTE_MAX_LENGTH}  # T0 is t0 again
    assert api(alice).patch(f"/api/runs/{run.pk}/", body, format="json").status_code == 200
    assert run.tags.count() == MAX_TAGS


def test_runs_list_and_api_filter_by_tag(client, api, alice, make_run):
    tagged = make_run(alice, Status.SUCCEEDED, name="tagged run")
    make_run(alice, Status.SUCCEEDED, name="plain run")
    api(alice).patch(f"/api/runs/{tagged.pk}/", {"tags": ["baseline"]}, format="json")
    client.force_login(alice)
    html = client.get(reverse("run-list"), {"tag": "Baseline"}).content.decode()
    assert "tagged run" in html and "plain run" not in html
    rows = api(alice).get("/api/runs/", {"tag": "baseline"}).json()
    rows = rows["results"] if isinstance(rows, dict) else rows
    assert [r["id"] for r in rows] == [tagged.pk] and rows[0]["tags"] == ["baseline"]
    rows = api(alice).get("/api/runs/", {"tag": "nothing"}).json()
    assert (rows["results"] if isinstance(rows, dict) else rows) == []


def test_compare_adds_the_runs_with_a_tag(client, api, alice, make_run):
    first = make_run(alice, Status.SUCCEEDED, name="sweep a")
    second = make_run(alice, Status.SUCCEEDED, name="sweep b")
    other = make_run(alice, Status.SUCCEEDED, name="unrelated")
    for run in (first, second):
        api(alice).patch(f"/api/runs/{run.pk}/", {"tags": ["sweep:lr"]}, format="json")
    client.force_login(alice)
    reply = client.get(reverse("run-compare"), {"tag": "sweep:lr"})
    ids = [r.pk for r in reply.context["runs"]]
    assert ids == [first.pk, second.pk] and other.pk not in ids


def test_leaderboard_filters_by_run_tag(client, api, alice, make_run, finished_run):
    other = make_run(alice, Status.SUCCEEDED, name="other run")
    other_ckpt = add_checkpoint(other, 10)
    ckpt = finished_run.checkpoints.order_by("step").last()
    for checkpoint, value in ((ckpt, 0.4321), (other_ckpt, 0.1234)):
        EvalResult.objects.create(
            run=checkpoint.run, checkpoint=checkpoint, task="chatcore", metric="score", value=value
        )
    api(alice).patch(f"/api/runs/{finished_run.pk}/", {"tags": ["keep"]}, format="json")
    client.force_login(alice)
    html = client.get(reverse("leaderboard")).content.decode()
    assert "0.4321" in html and "0.1234" in html
    html = client.get(reverse("leaderboard"), {"tag": "keep"}).content.decode()
    assert "0.4321" in html and "0.1234" not in html
    assert "tag=keep&amp;download=csv" in html
    reply = client.get(reverse("leaderboard"), {"tag": "keep", "download": "csv"})
    csv = b"".join(reply.streaming_content).decode()
    assert "0.4321" in csv and "0.1234" not in csv
