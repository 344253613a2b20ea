"""Downloads: a run's metric points (CSV, JSON lines), the leaderboard and compare tables (CSV).

Test client only: the files are read back and compared with the database rows and the pages.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.urls import reverse

from arena.ratings import Rating
from runs import exports
from runs.models import EvalResult, MetricPoint, Status

pytestmark = pytest.mark.django_db


@pytest.fixture
def signed_in(client, alice):
    client.force_login(alice)
    return client


def body(response) -> str:
    return b"".join(response.streaming_content).decode()


def csv_rows(response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body(response))))


def stored(run, names=None) -> list[tuple]:
    points = MetricPoint.objects.filter(run=run).order_by("name", "step", "id")
    if names:
        points = points.filter(name__in=names)
    return list(points.values_list("name", "step", "value", "time"))


def test_metrics_csv_is_every_point_and_values_round_trip(api, alice, finished_run):
    MetricPoint.objects.create(run=finished_run, name="train/loss", step=1000, value=None,
                               time=1_700_000_999.123456789)  # fmt: skip
    MetricPoint.objects.create(run=finished_run, name="val/bpb", step=1000, value=1 / 3, time=1.5)
    response = api(alice).get(reverse("runs-api:run-metrics-csv", args=[finished_run.pk]))
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == (
        f'attachment; filename="run-{finished_run.pk}-metrics.csv"'
    )
    header, *rows = csv_rows(response)
    assert header == ["name", "step", "value", "time"]
    parsed = [(n, int(s), float(v) if v else None, float(t)) for n, s, v, t in rows]
    assert parsed == stored(finished_run)
    assert len(parsed) == 1000 + 10 + 2  # more than a chunk: chunks join without gaps


def test_metrics_jsonl_is_every_point(api, alice, finished_run):
    MetricPoint.objects.create(run=finished_run, name="val/bpb", step=1000, value=None, time=2.0)
    response = api(alice).get(reverse("runs-api:run-metrics-jsonl", args=[finished_run.pk]))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-ndjson; charset=utf-8"
    assert f'filename="run-{finished_run.pk}-metrics.jsonl"' in response["Content-Disposition"]
    lines = [json.loads(line) for line in body(response).splitlines()]
    assert [(p["name"], p["step"], p["value"], p["time"]) for p in lines] == stored(finished_run)


def test_metrics_download_of_chosen_names(api, alice, finished_run):
    url = reverse("runs-api:run-metrics-csv", args=[finished_run.pk])
    rows = csv_rows(api(alice).get(url, {"names": "val/bpb"}))[1:]
    assert {r[0] for r in rows} == {"val/bpb"} and len(rows) == 10
    url = reverse("runs-api:run-metrics-jsonl", args=[finished_run.pk])
    lines = body(api(alice).get(url, {"names": " val/bpb,train/loss,"})).splitlines()
    assert len(lines) == 1010


@pytest.mark.parametrize(
    "names",
    ["train/loss,nope", "x" * 65, ",".join(f"m{i}" for i in range(101)), "a\x00b"],
)
def test_bad_names_are_a_400_naming_names(api, alice, finished_run, names):
    for name in ("runs-api:run-metrics-csv", "runs-api:run-metrics-jsonl"):
        response = api(alice).get(reverse(name, args=[finished_run.pk]), {"names": names},
                                  HTTP_ACCEPT="text/csv")  # fmt: skip
        assert response.status_code == 400
        assert response["Content-Type"] == "application/json"
        assert "names" in response.json()


def test_unknown_run_is_a_404(api, alice):
    assert api(alice).get(reverse("runs-api:run-metrics-csv", args=[999999])).status_code == 404


def test_downloads_need_a_signed_in_user(api, client, finished_run):
    for name in ("runs-api:run-metrics-csv", "runs-api:run-metrics-jsonl"):
        assert api().get(reverse(name, args=[finished_run.pk])).status_code in (401, 403)
    for url in (reverse("leaderboard"), reverse("run-compare")):
        response = client.get(url, {"download": "csv", "ids": finished_run.pk})
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_run_page_links_the_downloads(signed_in, finished_run):
    html = signed_in.get(reverse("run-detail", args=[finished_run.pk])).content.decode()
    assert reverse("runs-api:run-metrics-csv", args=[finished_run.pk]) in html
    assert reverse("runs-api:run-metrics-jsonl", args=[finished_run.pk]) in html


def test_leaderboard_csv_has_the_pages_rows_and_arena(signed_in, finished_run, monkeypatch):
    low, high = finished_run.checkpoints.order_by("step")
    for checkpoint, chatcore, gsm in ((low, 0.1, 0.5), (high, 0.3, 0.2)):
        EvalResult.objects.create(run=finished_run, checkpoint=checkpoint, task="chatcore",
                                  metric="score", value=chatcore)  # fmt: skip
        EvalResult.objects.create(run=finished_run, checkpoint=checkpoint, task="gsm8k",
                                  metric="accuracy", value=gsm,
                                  data_source=EvalResult.DataSource.OFFLINE)  # fmt: skip
    rating = Rating(rating=1012.5, low=990.0, high=1035.0, votes=3)
    monkeypatch.setattr("arena.services.ratings_by_checkpoint", lambda: {low.pk: rating})
    finished_run.name = "=HYPERLINK(1)"
    finished_run.save(update_fields=["name"])
    html = signed_in.get(reverse("leaderboard"), {"sort": "GSM8K"}).content.decode()
    assert 'id="leaderboard-download"' in html and "download=csv" in html
    response = signed_in.get(reverse("leaderboard"), {"sort": "GSM8K", "download": "csv"})
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert 'filename="leaderboard.csv"' in response["Content-Disposition"]
    header, *rows = csv_rows(response)
    assert header[:8] == ["rank", "checkpoint", "stage", "step", "depth", "run", "run name",
                          "model"]  # fmt: skip
    assert header[-4:] == ["offline", "Arena", "Arena ±", "Arena votes"]
    cells = [dict(zip(header, row, strict=True)) for row in rows]
    assert [c["checkpoint"] for c in cells] == [str(low.pk), str(high.pk)]  # the page's order
    assert html.index("0.5000") < html.index("0.2000")
    assert [float(c["GSM8K"]) for c in cells] == [0.5, 0.2]
    assert [float(c["ChatCORE"]) for c in cells] == [0.1, 0.3]
    assert cells[0]["offline"] == "GSM8K" and cells[0]["CORE"] == ""
    assert float(cells[0]["Arena"]) == 1012.5 and cells[0]["Arena votes"] == "3"
    assert cells[1]["Arena"] == ""
    assert cells[0]["run name"] == "'=HYPERLINK(1)"  # not a formula in a spreadsheet
    for c in cells:  # each value is the one the page shows, rounded as it rounds
        assert f"{float(c['GSM8K']):.4f}" in html


def test_compare_csv_has_final_metrics_and_diff_rows(signed_in, alice, make_run, finished_run):
    other = make_run(alice, Status.SUCCEEDED, name="other")
    other.config = {**finished_run.config, "depth": 6}
    other.save()
    query = {"ids": f"{finished_run.pk},{other.pk}", "metrics": "train/loss"}
    html = signed_in.get(reverse("run-compare"), query).content.decode()
    assert 'id="compare-download"' in html
    response = signed_in.get(reverse("run-compare"), {**query, "download": "csv"})
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert (
        f'filename="compare-{finished_run.pk}-{other.pk}.csv"' in (response["Content-Disposition"])
    )
    header, *rows = csv_rows(response)
    assert header == ["section", "row", f"run {finished_run.pk}", f"run {other.pk}"]
    by_row = {(r[0], r[1]): r[2:] for r in rows}
    assert float(by_row["final", "train/loss"][0]) == 5.0 - 999 / 400  # the page's 2.5025
    assert by_row["final", "train/loss"][1] == ""
    assert by_row["final", "steps"] == [str(finished_run.step), str(other.step)]
    assert by_row["config", "depth"] == [str(finished_run.config["depth"]), "6"]
    assert not any(r[1] == "num_iterations" for r in rows)  # the same in both runs


def test_csv_chunks_write_many_rows_in_pieces():
    rows = [(i, f"+{i}") for i in range(exports.ROWS_PER_CHUNK * 2 + 1)]
    chunks = list(exports.csv_chunks(["n", "text"], rows))
    assert len(chunks) == 3
    read = list(csv.reader(io.StringIO("".join(chunks))))
    assert read[1] == ["0", "'+0"] and len(read) == len(rows) + 1
