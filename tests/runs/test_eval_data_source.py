"""Scores on offline sample data are told apart from benchmark scores: in the API and on the
leaderboard (the programs' side: test_base_eval / test_chat_eval; ingestion: test_ingest)."""

from django.urls import reverse

from runs.models import EvalResult

LEGEND = "offline sample data, not the real benchmark"


def test_leaderboard_marks_offline_scores_with_a_legend(client, alice, finished_run):
    client.force_login(alice)
    offline, hub = finished_run.checkpoints.order_by("step")
    EvalResult.objects.create(run=finished_run, checkpoint=offline, task="arc_easy",
                              metric="accuracy", value=0.61, data_source="offline")  # fmt: skip
    EvalResult.objects.create(run=finished_run, checkpoint=hub, task="arc_easy",
                              metric="accuracy", value=0.42, data_source="hub")  # fmt: skip
    html = client.get(reverse("leaderboard")).content.decode()
    dagger = f'<sup class="offline" title="{LEGEND}">†</sup>'
    assert f"0.6100{dagger}</td>" in html
    assert "0.4200</td>" in html  # a benchmark score: no mark
    assert html.count(dagger) == 1
    assert f'<p class="hint" id="offline-legend">† {LEGEND}</p>' in html


def test_a_later_benchmark_score_replaces_an_offline_one_and_its_mark(client, alice, finished_run):
    client.force_login(alice)
    checkpoint = finished_run.checkpoints.first()
    for value, source in ((0.61, "offline"), (0.42, "hub")):
        EvalResult.objects.create(run=finished_run, checkpoint=checkpoint, task="mmlu",
                                  metric="accuracy", value=value, data_source=source)  # fmt: skip
    html = client.get(reverse("leaderboard")).content.decode()
    assert "0.4200</td>" in html and "†</sup>" not in html


def test_the_api_names_each_results_data_source(api, alice, finished_run):
    EvalResult.objects.create(run=finished_run, task="core", metric="score", value=0.1,
                              data_source="offline")  # fmt: skip
    EvalResult.objects.create(run=finished_run, task="old", metric="score", value=0.2)
    rows = api(alice).get("/api/evals/", {"run": finished_run.pk}).json()["results"]
    assert {r["task"]: r["data_source"] for r in rows} == {"core": "offline", "old": ""}
