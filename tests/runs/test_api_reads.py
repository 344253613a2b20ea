"""Reading through the API: lists and filters, run detail, metrics, log, events, report."""

import pytest

from runs.models import Kind, Status
from tests.runs.conftest import LOSS_POINTS

pytestmark = pytest.mark.django_db


def test_programs_list_every_kind_with_flags_presets_and_dataset_sources(api, alice):
    programs = {p["kind"]: p for p in api(alice).get("/api/programs/").json()}
    assert set(programs) == {"dataset", "tokenizer", "base", "base_eval", "mid", "sft", "rl",
                             "chat_eval", "pipeline"}  # fmt: skip
    assert programs["sft"]["inputs"] == ["parent_checkpoint"]
    assert "source_step" not in {f["name"] for f in programs["sft"]["flags"]}  # set by the app
    assert programs["pipeline"]["presets"]["demo-cpu"]["base_preset"] == "demo-cpu"
    base = programs["base"]
    assert base["inputs"] == ["dataset", "tokenizer"]
    assert base["distributed"] and base["resumable"]
    assert base["presets"]["tiny"]["depth"] == 2
    flags = {f["name"]: f for f in base["flags"]}
    assert flags["depth"] == {
        "name": "depth", "type": "int", "default": 20, "help": flags["depth"]["help"],
        "choices": None, "min": 1.0, "max": 256.0,
    }  # fmt: skip
    assert "run_dir" not in flags and "resume_from_step" not in flags  # set by the app
    assert flags["dtype"]["choices"]
    dataset = programs["dataset"]
    assert dataset["submit_via"] == "/api/datasets/"
    assert set(dataset["sources"]) == {"builtin", "download", "upload", "path"}
    assert "shards" in {f["name"] for f in dataset["sources"]["builtin"]}
    assert "overwrite" not in {f["name"] for f in dataset["sources"]["builtin"]}
    assert dataset["sources"]["path"] == []
    assert programs["tokenizer"]["sources"] is None


def test_run_list_is_newest_first_and_filters(api, alice, bob, make_run):
    first = make_run(alice, Status.SUCCEEDED, name="alpha one")
    second = make_run(bob, Status.FAILED, name="beta two")
    third = make_run(alice, Status.QUEUED, name="alpha three")
    client = api(bob)

    def ids(query=""):
        response = client.get(f"/api/runs/{query}")
        assert response.status_code == 200, response.content
        return [run["id"] for run in response.json()["results"]]

    assert ids() == [third.pk, second.pk, first.pk]
    assert ids("?status=failed") == [second.pk]
    assert ids("?owner=alice") == [third.pk, first.pk]
    assert ids("?mine=1") == [second.pk]
    assert ids("?search=ALPHA") == [third.pk, first.pk]
    assert ids("?kind=tokenizer") == []
    assert ids(f"?kind={Kind.BASE}&status=queued") == [third.pk]


def test_run_list_is_paginated_by_50(api, alice, make_run):
    for i in range(55):
        make_run(alice, name=f"run {i}")
    page = api(alice).get("/api/runs/").json()
    assert page["count"] == 55 and len(page["results"]) == 50 and page["next"]
    rest = api(alice).get(page["next"]).json()
    assert len(rest["results"]) == 5 and rest["next"] is None


def test_run_detail_shows_state_inputs_counts_and_links(api, alice, bob, finished_run):
    data = api(alice).get(f"/api/runs/{finished_run.pk}/").json()
    assert data["status"] == "succeeded" and data["exit_code"] == 0
    assert data["dataset"] == {"id": finished_run.dataset_id, "name": "corpus"}
    assert data["tokenizer"]["name"] == "tok512"
    assert data["config"]["depth"] == 2 and data["preset"] == "tiny"
    assert data["counts"] == {
        "checkpoints": 2, "metric_points": LOSS_POINTS + 10, "events": 6, "samples": 1,
    }  # fmt: skip
    assert data["owner"] == "alice" and data["can_manage"] is True
    assert data["links"]["metrics"].endswith(f"/api/runs/{finished_run.pk}/metrics/")
    assert api(bob).get(f"/api/runs/{finished_run.pk}/").json()["can_manage"] is False


def test_metrics_downsample_to_max_points_keeping_first_and_last(api, alice, finished_run):
    url = f"/api/runs/{finished_run.pk}/metrics/?names=train/loss,val/bpb&max_points=100"
    data = api(alice).get(url).json()
    assert data["names"] == ["train/loss", "val/bpb"]
    loss = data["series"]["train/loss"]
    assert loss["total"] == LOSS_POINTS
    assert 2 < len(loss["step"]) <= 100
    assert loss["step"][0] == 0 and loss["step"][-1] == LOSS_POINTS - 1
    assert loss["step"] == sorted(loss["step"])
    assert len(data["series"]["val/bpb"]["step"]) == 10  # fewer than max_points: all of them


def test_metrics_without_names_return_every_series_and_after_step_filters(api, alice, finished_run):
    url = f"/api/runs/{finished_run.pk}/metrics/?after_step=900"
    data = api(alice).get(url).json()
    assert set(data["series"]) == {"train/loss", "val/bpb"}
    assert data["series"]["train/loss"]["step"][0] == 901
    assert data["series"]["val/bpb"]["step"] == []


def test_log_returns_the_last_lines_of_the_run_log(api, alice, finished_run):
    finished_run.directory.mkdir(parents=True, exist_ok=True)
    (finished_run.directory / "log.txt").write_text("".join(f"line {i}\n" for i in range(500)))
    data = api(alice).get(f"/api/runs/{finished_run.pk}/log/?lines=3").json()
    assert data == {"lines": ["line 497", "line 498", "line 499"]}
    default = api(alice).get(f"/api/runs/{finished_run.pk}/log/").json()
    assert len(default["lines"]) == 200 and default["lines"][-1] == "line 499"


def test_log_of_a_run_without_a_log_file_is_empty(api, alice, make_run):
    run = make_run(alice)
    assert api(alice).get(f"/api/runs/{run.pk}/log/").json() == {"lines": []}


def test_events_are_read_with_a_cursor(api, alice, finished_run):
    client = api(alice)
    url = f"/api/runs/{finished_run.pk}/events/"
    page = client.get(url, {"limit": 4}).json()
    assert [e["seq"] for e in page["events"]] == [0, 1, 2, 3]
    assert page["events"][2] == {
        "seq": 2, "type": "checkpoint", "time": page["events"][2]["time"], "step": 500,
        "data": {"n": 2},
    }  # fmt: skip
    rest = client.get(url, {"after": page["next_after"]}).json()
    assert [e["seq"] for e in rest["events"]] == [4, 5]
    done = client.get(url, {"after": rest["next_after"]}).json()
    assert done == {"events": [], "next_after": 5}
    checkpoints = client.get(url, {"type": "checkpoint"}).json()
    assert [e["step"] for e in checkpoints["events"]] == [500, 999]


def test_report_joins_sections_in_order(api, alice, finished_run):
    data = api(alice).get(f"/api/runs/{finished_run.pk}/report/").json()
    assert [s["section"] for s in data["sections"]] == ["Training", "Evaluation"]
    assert data["markdown"] == "## Training\nloss went down\n\n## Evaluation\nbpb 2.4"
    listed = api(alice).get("/api/reports/", {"run": finished_run.pk}).json()
    assert listed["count"] == 2


def test_samples(api, alice, finished_run):
    data = api(alice).get(f"/api/runs/{finished_run.pk}/samples/").json()
    assert data["run"] == finished_run.pk
    assert [(s["step"], s["prompt"]) for s in data["samples"]] == [
        (999, "The capital of France is")
    ]


def test_artifact_lists_show_status_inputs_and_build_run(
    api, alice, bob, finished_run, ready_dataset, ready_tokenizer
):
    tokenizers = api(bob).get("/api/tokenizers/").json()["results"]
    assert tokenizers[0]["dataset"] == {"id": ready_dataset.pk, "name": "corpus"}
    assert tokenizers[0]["status"] == "ready" and tokenizers[0]["vocab_size"] == 512
    assert tokenizers[0]["run"] is None and tokenizers[0]["can_manage"] is False
    datasets = api(alice).get(f"/api/datasets/{ready_dataset.pk}/").json()
    assert datasets["name"] == "corpus" and datasets["can_manage"] is True


def test_checkpoint_and_eval_filters(api, alice, finished_run, make_run):
    other = make_run(alice, Status.SUCCEEDED)
    finished_run.eval_results.create(task="core", metric="score", value=0.1)
    other.eval_results.create(task="arc", metric="accuracy", value=0.3)
    client = api(alice)
    steps = [c["step"] for c in client.get("/api/checkpoints/?stage=base").json()["results"]]
    assert sorted(steps) == [500, 999]
    assert client.get(f"/api/checkpoints/?run={other.pk}").json()["count"] == 0
    assert client.get("/api/evals/?task=arc").json()["results"][0]["run"] == other.pk
    assert client.get(f"/api/evals/?run={finished_run.pk}").json()["count"] == 1


@pytest.mark.parametrize("url", ["/api/runs/", "/api/datasets/", "/api/tokenizers/"])
def test_list_queries_do_not_grow_with_the_number_of_rows(
    api, alice, make_run, make_dataset, make_tokenizer,
    django_assert_max_num_queries, url,
):  # fmt: skip
    for i in range(20):
        make_run(alice, name=f"run {i}")
        make_tokenizer(alice, make_dataset(alice, name=f"d{i}"), name=f"t{i}")
    client = api(alice)
    with django_assert_max_num_queries(6):
        assert len(client.get(url).json()["results"]) >= 20
