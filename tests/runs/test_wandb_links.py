"""Weights & Biases on the web side: a run may name a project (form, API), its program is given
it, the worker's WANDB_* settings reach the program, and the run page and the API say where the
W&B copy is (from the start event the program wrote), never linking to anything but http(s)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from runs import ingest
from runs.execution import child_env
from runs.models import Run, Status
from runs.programs import PROGRAMS
from runs.wandb_info import describe

pytestmark = pytest.mark.django_db

OFFLINE = {"project": "nanochat", "group": "run-3", "mode": "offline", "run_id": "abc123",
           "dir": "/data/runs/run-000003/wandb/offline-run-20260101_000000-abc123"}  # fmt: skip
ONLINE = {"project": "nanochat", "mode": "online", "run_id": "abc123",
          "url": "https://wandb.ai/team/nanochat/runs/abc123", "dir": "/data/x"}  # fmt: skip


def started(run, wandb: dict | None, seq_time: float = 1.0) -> None:
    """The run's program wrote a start event (with `wandb` when it logs to W&B); ingested as a
    worker ingests it."""
    event = {"type": "start", "time": seq_time, "config": {"depth": 2}, "total_steps": 20,
             "world_size": 1, "device": "cpu", "program": "base_train"}  # fmt: skip
    if wandb is not None:
        event["wandb"] = wandb
    run.refresh_from_db()
    ingest.apply(run, ingest.parse_events([event]), run.events_offset + 100)


def page(client, run) -> str:
    return client.get(reverse("run-detail", args=[run.pk])).content.decode()


def test_the_run_page_shows_an_offline_run_and_how_to_upload_it(client, alice, make_run):
    run = make_run(alice, Status.RUNNING)
    started(run, OFFLINE)
    client.force_login(alice)
    html = page(client, run)
    assert 'id="run-wandb"' in html and "W&amp;B (offline, project nanochat)" in html
    assert f"<code>{OFFLINE['dir']}</code>" in html
    assert f"<code>wandb sync {OFFLINE['dir']}</code>" in html


def test_the_run_page_links_an_online_run_and_the_latest_start_counts(client, alice, make_run):
    run = make_run(alice, Status.SUCCEEDED)
    started(run, OFFLINE)
    started(run, ONLINE, seq_time=2.0)  # resumed: a new W&B run
    client.force_login(alice)
    html = page(client, run)
    assert f'<a href="{ONLINE["url"]}" target="_blank" rel="noopener noreferrer">' in html
    assert "nanochat / abc123</a>" in html
    assert "wandb sync" not in html


def test_why_a_run_has_no_wandb_copy_is_shown(client, alice, make_run):
    run = make_run(alice, Status.SUCCEEDED)
    error = (
        "wandb is not installed (No module named 'wandb'); pip install -r requirements-wandb.txt"
    )
    started(run, {"project": "nanochat", "error": error})
    client.force_login(alice)
    html = page(client, run)
    assert "W&amp;B (nanochat): not logged: wandb is not installed" in html


def test_no_wandb_line_for_a_run_without_wandb(client, alice, make_run):
    run = make_run(alice, Status.SUCCEEDED)
    started(run, None)
    client.force_login(alice)
    assert 'id="run-wandb"' not in page(client, run)


def test_hostile_start_events_never_become_links_or_markup(client, alice, make_run):
    run = make_run(alice, Status.SUCCEEDED)
    started(run, {"project": "<b>p</b>", "mode": "online", "run_id": "x",
                  "url": "javascript:alert(1)", "dir": "x" * 10_000})  # fmt: skip
    client.force_login(alice)
    html = page(client, run)
    assert "javascript:" not in html and "<b>p</b>" not in html
    assert "&lt;b&gt;p&lt;/b&gt;" in html
    assert "x" * 501 not in html  # bounded
    # Whatever shape the field has, the reading is total.
    for raw in (None, "s", [], {"wandb": "x"}, {"wandb": {"project": 3}}, {"wandb": {"url": "h"}}):
        assert describe(raw) is None
    assert describe({"wandb": {"project": "p", "url": "//evil.example/x"}}) == {"project": "p"}


def test_the_api_gives_the_wandb_copy(api, alice, make_run):
    run = make_run(alice, Status.SUCCEEDED)
    data = api(alice).get(f"/api/runs/{run.pk}/").json()
    assert data["wandb"] is None
    started(run, OFFLINE)
    data = api(alice).get(f"/api/runs/{run.pk}/").json()
    assert data["wandb"] == {**OFFLINE, "sync_command": f"wandb sync {OFFLINE['dir']}"}


def test_a_run_names_its_wandb_project_and_the_program_gets_it(
    api, alice, ready_dataset, ready_tokenizer
):
    body = {"kind": "base", "preset": "tiny", "dataset": ready_dataset.pk,
            "tokenizer": ready_tokenizer.pk}  # fmt: skip
    for bad in ("team/project", "../x", "a" * 65, "a b"):
        reply = api(alice).post("/api/runs/", {**body, "config": {"wandb_project": bad}},
                                format="json")  # fmt: skip
        assert reply.status_code == 400 and "config.wandb_project" in reply.json(), bad
    config = {"wandb_project": "nanochat-sweeps", "wandb_group": "lr-sweep"}
    reply = api(alice).post("/api/runs/", {**body, "config": config}, format="json")
    assert reply.status_code == 201, reply.content
    run = Run.objects.get(pk=reply.json()["id"])
    [argv] = PROGRAMS["base"].commands(run)
    assert argv[argv.index("--wandb-project") + 1] == "nanochat-sweeps"
    assert argv[argv.index("--wandb-group") + 1] == "lr-sweep"


def test_the_new_run_form_offers_the_wandb_fields(client, alice, ready_dataset, ready_tokenizer):
    client.force_login(alice)
    html = client.get(reverse("run-new", args=["base"])).content.decode()
    assert 'name="wandb_project"' in html and 'name="wandb_group"' in html
    reply = client.post(reverse("run-new", args=["base"]), {
        "preset": "tiny", "dataset": ready_dataset.pk, "tokenizer": ready_tokenizer.pk,
        "nproc_per_node": 1, "wandb_project": "bad/name",
    })  # fmt: skip
    assert reply.status_code == 400 and "one folder name" in reply.content.decode()


def test_the_workers_wandb_settings_reach_the_programs(monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "team-runs")
    monkeypatch.setenv("WANDB_MODE", "offline")
    env = child_env()
    assert env["WANDB_PROJECT"] == "team-runs" and env["WANDB_MODE"] == "offline"
