"""Dashboard pages: status codes, who may do what, and the content each page must show."""

from __future__ import annotations

import pytest
from django.urls import reverse

from runs.models import Checkpoint, EvalResult, Kind, Run, Status, Tokenizer
from tests.runs.conftest import add_checkpoint

pytestmark = pytest.mark.django_db

PAGES = [
    ("home", []),
    ("run-list", []),
    ("run-compare", []),
    ("datasets", []),
    ("tokenizers", []),
    ("checkpoints", []),
    ("leaderboard", []),
    ("reports", []),
]


@pytest.fixture
def signed_in(client, alice):
    client.force_login(alice)
    return client


@pytest.mark.parametrize("name,args", PAGES)
def test_every_page_needs_login(client, name, args):
    response = client.get(reverse(name, args=args))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_run_pages_need_login(client, finished_run):
    for url in (
        reverse("run-detail", args=[finished_run.pk]),
        reverse("run-new", args=["base"]),
        reverse("report-detail", args=[finished_run.pk]),
        reverse("run-log", args=[finished_run.pk]),
    ):
        assert client.get(url).status_code == 302, url


@pytest.mark.parametrize("name,args", PAGES)
def test_every_page_renders_with_navigation(signed_in, name, args):
    response = signed_in.get(reverse(name, args=args))
    assert response.status_code == 200
    html = response.content.decode()
    for target in ("run-list", "run-compare", "datasets", "checkpoints", "leaderboard", "reports"):
        assert f'href="{reverse(target)}"' in html
    assert f'href="{reverse("chat-page")}"' in html
    assert reverse("admin:index") not in html  # alice is not staff


def test_staff_see_the_admin_link(client, staff):
    client.force_login(staff)
    assert reverse("admin:index") in client.get(reverse("home")).content.decode()


# ---- home ----------------------------------------------------------------------------------


def test_home_of_an_empty_install_offers_the_quick_start(signed_in):
    html = signed_in.get(reverse("home")).content.decode()
    assert 'id="quickstart"' in html
    assert "Nothing is running." in html


def test_home_shows_running_and_queued_runs_checkpoints_and_scores(signed_in, alice, make_run,
                                                                   finished_run):  # fmt: skip
    running = make_run(alice, Status.RUNNING, name="big run", progress=0.42, eta_seconds=125,
                       step=42, total_steps=100)  # fmt: skip
    queued = make_run(alice, name="waiting run")
    checkpoint = finished_run.checkpoints.order_by("-step").first()
    EvalResult.objects.create(run=finished_run, checkpoint=checkpoint, task="core",
                              metric="centered", value=0.1234)  # fmt: skip
    html = signed_in.get(reverse("home")).content.decode()
    assert 'id="quickstart"' not in html
    assert f'data-run-id="{running.pk}"' in html and "big run" in html
    assert "width: 42%" in html and "ETA 2m 05s" in html
    assert f'data-run-id="{queued.pk}"' in html and "waiting run" in html
    assert f"{reverse('chat-page')}?checkpoint={checkpoint.pk}" in html
    assert "0.1234" in html  # the eval highlight


# ---- runs list -----------------------------------------------------------------------------


def test_run_list_filters(signed_in, alice, bob, make_run):
    mine = make_run(alice, Status.FAILED, name="alpha")
    theirs = make_run(bob, Status.SUCCEEDED, name="beta")
    url = reverse("run-list")

    def shown(**params) -> set[int]:
        html = signed_in.get(url, params).content.decode()
        return {r.pk for r in (mine, theirs) if f'data-run-id="{r.pk}"' in html}

    assert shown() == {mine.pk, theirs.pk}
    assert shown(status="failed") == {mine.pk}
    assert shown(owner="bob") == {theirs.pk}
    assert shown(mine="1") == {mine.pk}
    assert shown(search="bet") == {theirs.pk}
    assert shown(kind="tokenizer") == set()


# ---- new run -------------------------------------------------------------------------------


def test_new_run_form_lists_presets_inputs_and_flags(signed_in, ready_dataset, ready_tokenizer):
    html = signed_in.get(reverse("run-new", args=["base"])).content.decode()
    for text in ('value="tiny"', 'value="demo-cpu"', 'name="depth"', 'name="dataset"',
                 'name="tokenizer"', 'name="nproc_per_node"', ready_dataset.name):  # fmt: skip
        assert text in html
    assert 'name="data_dir"' not in html  # paths are the app's business


def test_new_run_form_starts_a_run(signed_in, alice, ready_dataset, ready_tokenizer,
                                   django_capture_on_commit_callbacks):  # fmt: skip
    data = {"name": "from the form", "preset": "tiny", "dataset": ready_dataset.pk,
            "tokenizer": ready_tokenizer.pk, "nproc_per_node": 1, "num_iterations": 7}  # fmt: skip
    with django_capture_on_commit_callbacks():
        response = signed_in.post(reverse("run-new", args=["base"]), data)
    run = Run.objects.get(name="from the form")
    assert response.status_code == 302
    assert response["Location"] == reverse("run-detail", args=[run.pk])
    assert run.owner == alice and run.preset == "tiny" and run.status == Status.QUEUED
    assert run.overrides == {"num_iterations": 7} and run.config["num_iterations"] == 7


def test_new_run_form_shows_errors_next_to_the_fields(signed_in, ready_dataset, ready_tokenizer):
    data = {"preset": "tiny", "dataset": ready_dataset.pk, "tokenizer": ready_tokenizer.pk,
            "nproc_per_node": 1, "depth": 0, "total_batch_size": 1000}  # fmt: skip
    response = signed_in.post(reverse("run-new", args=["base"]), data)
    assert response.status_code == 400
    html = response.content.decode()
    assert 'data-error-for="depth"' in html
    assert not Run.objects.exists()


def test_new_run_form_batch_arithmetic_error_names_the_field(signed_in, ready_dataset,
                                                             ready_tokenizer):  # fmt: skip
    data = {"preset": "tiny", "dataset": ready_dataset.pk, "tokenizer": ready_tokenizer.pk,
            "nproc_per_node": 1, "total_batch_size": 1000}  # fmt: skip
    response = signed_in.post(reverse("run-new", args=["base"]), data)
    assert response.status_code == 400
    assert 'data-error-for="total_batch_size"' in response.content.decode()


def test_new_run_form_requires_inputs(signed_in):
    response = signed_in.post(reverse("run-new", args=["base"]), {"preset": "tiny"})
    assert response.status_code == 400
    html = response.content.decode()
    assert 'data-error-for="dataset"' in html and 'data-error-for="tokenizer"' in html


def test_new_run_form_of_unknown_or_dataset_kind_is_404(signed_in):
    assert signed_in.get(reverse("run-new", args=["nope"])).status_code == 404
    assert signed_in.get(reverse("run-new", args=["dataset"])).status_code == 404


def test_new_run_form_prefills_from_the_query(signed_in):
    response = signed_in.get(reverse("run-new", args=["base"]), {"preset": "tiny", "bogus": "1"})
    assert '<option value="tiny" selected>' in response.content.decode()


# ---- run detail ----------------------------------------------------------------------------


def test_run_detail_shows_everything_about_the_run(signed_in, finished_run):
    checkpoint = finished_run.checkpoints.order_by("-step").first()
    EvalResult.objects.create(run=finished_run, checkpoint=checkpoint, task="ARC-Easy",
                              metric="accuracy", value=0.3)  # fmt: skip
    html = signed_in.get(reverse("run-detail", args=[finished_run.pk])).content.decode()
    assert 'id="run-status"' in html and "succeeded" in html
    assert "The capital of France is" in html  # samples
    assert "loss went down" in html and "data-markdown" in html  # report (rendered client-side)
    assert f"{reverse('chat-page')}?checkpoint={checkpoint.pk}" in html
    assert "ARC-Easy" in html and "0.3000" in html
    assert 'id="chart-config"' in html and "train/loss" in html and "val/bpb" in html
    assert "num_iterations" in html  # config table
    assert 'id="retry-run"' in html and 'id="cancel-run"' not in html


def test_run_detail_shows_the_optimizer_groups_the_run_started_with(signed_in, finished_run):
    # What base_train records in its start event (derived.optimizer): LRs after scaling.
    groups = [
        {"name": "lm_head", "kind": "adamw", "lr": 0.000707, "weight_decay": 0.01,
         "betas": [0.8, 0.96]},
        {"name": "muon 256x256", "kind": "muon", "lr": 0.00176776, "weight_decay": 0.43,
         "momentum": 0.95},
        {"name": "<b>odd</b>", "kind": "adamw", "lr": "0.1; DROP", "weight_decay": "Infinity",
         "betas": "x"},
        "not a group",
    ]  # fmt: skip
    start = finished_run.events.get(type="start")
    start.data = {"config": {}, "derived": {"optimizer": {"lr_scale": 0.088, "groups": groups}}}
    start.save(update_fields=["data"])
    html = signed_in.get(reverse("run-detail", args=[finished_run.pk])).content.decode()
    table = html[html.index('id="optimizer-groups"') :]
    assert "lm_head" in table and "0.000707" in table and "betas 0.8, 0.96" in table
    assert "muon 256x256" in table and "0.001768" in table and "momentum 0.95" in table
    # Whatever a run wrote is shown as numbers or "-", and escaped.
    assert "DROP" not in table and "<b>odd</b>" not in table and "&lt;b&gt;odd" in table
    assert "not a group" not in table


def test_run_detail_buttons_follow_status_and_ownership(client, alice, bob, make_run):
    running = make_run(alice, Status.RUNNING)
    client.force_login(alice)
    html = client.get(reverse("run-detail", args=[running.pk])).content.decode()
    assert 'id="cancel-run"' in html and 'id="retry-run"' not in html
    client.force_login(bob)
    html = client.get(reverse("run-detail", args=[running.pk])).content.decode()
    assert 'id="cancel-run"' not in html


def test_run_detail_panels_fragment(signed_in, finished_run):
    response = signed_in.get(reverse("run-detail", args=[finished_run.pk]), {"panels": "1"})
    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="checkpoints-panel"' in html and "<html" not in html


def test_unknown_run_is_404(signed_in):
    assert signed_in.get(reverse("run-detail", args=[999999])).status_code == 404


def test_cancel_button_cancels_a_queued_run(signed_in, alice, make_run):
    run = make_run(alice)
    response = signed_in.post(reverse("run-action", args=[run.pk, "cancel"]))
    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == Status.CANCELLED


def test_other_users_cannot_cancel(client, alice, bob, make_run):
    run = make_run(alice)
    client.force_login(bob)
    response = client.post(reverse("run-action", args=[run.pk, "cancel"]), follow=True)
    run.refresh_from_db()
    assert run.status == Status.QUEUED
    assert "only" in response.content.decode()  # the refusal is shown as a message


def test_actions_need_post(signed_in, alice, make_run):
    run = make_run(alice)
    assert signed_in.get(reverse("run-action", args=[run.pk, "cancel"])).status_code == 405


def test_retry_button_queues_a_new_run(signed_in, alice, make_run,
                                       django_capture_on_commit_callbacks):  # fmt: skip
    run = make_run(alice, Status.FAILED)
    with django_capture_on_commit_callbacks():
        response = signed_in.post(reverse("run-action", args=[run.pk, "retry"]))
    retry = Run.objects.get(retry_of=run)
    assert response["Location"] == reverse("run-detail", args=[retry.pk])


def test_log_tail_endpoint(signed_in, alice, make_run):
    run = make_run(alice, Status.RUNNING)
    run.directory.mkdir(parents=True)
    (run.directory / "log.txt").write_text("".join(f"line {i}\n" for i in range(500)))
    text = signed_in.get(reverse("run-log", args=[run.pk])).content.decode()
    assert text.splitlines()[-1] == "line 499" and "line 299" not in text


# ---- compare -------------------------------------------------------------------------------


def test_compare_shows_final_metrics_and_config_diff(signed_in, alice, make_run, finished_run):
    other = make_run(alice, Status.SUCCEEDED, name="other")
    other.config = {**finished_run.config, "depth": 6}
    other.save()
    response = signed_in.get(reverse("run-compare"), {"ids": f"{finished_run.pk},{other.pk}"})
    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="final-metrics"' in html and "2.5025" in html  # last train/loss of finished_run
    assert 'id="config-diff"' in html and "<th>depth</th>" in html
    assert "<th>num_iterations</th>" not in html  # same in both runs


def test_compare_without_runs_explains_how(signed_in):
    html = signed_in.get(reverse("run-compare")).content.decode()
    assert "Pick runs to compare" in html


# ---- artifacts -----------------------------------------------------------------------------


def test_datasets_page_lists_and_creates(signed_in, alice, ready_dataset,
                                         django_capture_on_commit_callbacks):  # fmt: skip
    html = signed_in.get(reverse("datasets")).content.decode()
    assert ready_dataset.name in html and 'id="dataset-form"' in html
    with django_capture_on_commit_callbacks():
        response = signed_in.post(reverse("datasets"), {"name": "fresh", "source": "builtin"})
    assert response.status_code == 302
    assert Run.objects.filter(kind=Kind.DATASET, dataset__name="fresh").exists()


def test_datasets_form_errors_name_the_field(signed_in, ready_dataset):
    response = signed_in.post(reverse("datasets"), {"name": ready_dataset.name, "source": "path",
                                                    "path": "/definitely/not/here"})  # fmt: skip
    html = response.content.decode()
    assert response.status_code == 400
    assert 'data-error-for="name"' in html
    assert "only staff" in html


def test_tokenizers_page_shows_the_compression_table(signed_in, ready_tokenizer, alice):
    # What tok_eval's eval event leaves in the stats (tok/ prefix, relative columns beside).
    ready_tokenizer.stats = {"tok/bytes_per_token/news": 4.25, "tok/bytes_per_token/code": 3.5,
                             "tok/vs_gpt2/news": -3.1}  # fmt: skip
    ready_tokenizer.save()
    older = Tokenizer.objects.create(name="older", owner=alice, path="/x", vocab_size=512,
                                     stats={"bytes_per_token/news": 2.5})  # fmt: skip
    html = signed_in.get(reverse("tokenizers")).content.decode()
    assert ready_tokenizer.name in html and older.name in html
    assert '<th class="measure">bytes/token · code</th>' in html
    assert '<th class="measure">bytes/token · news</th>' in html
    assert "vs_gpt2" not in html
    assert "4.25" in html and "3.50" in html and "2.50" in html


def test_checkpoints_page_filters_by_stage(signed_in, finished_run):
    add_checkpoint(finished_run, 1234).__class__.objects.filter(step=1234).update(stage="sft")
    html = signed_in.get(reverse("checkpoints"), {"stage": "sft"}).content.decode()
    assert "1234" in html and ">500<" not in html
    html = signed_in.get(reverse("checkpoints")).content.decode()
    assert ">500<" in html


def test_leaderboard_ranks_checkpoints_by_the_chosen_column(signed_in, finished_run):
    low, high = finished_run.checkpoints.order_by("step")
    for checkpoint, chatcore, gsm in ((low, 0.1, 0.5), (high, 0.3, 0.2)):
        EvalResult.objects.create(run=finished_run, checkpoint=checkpoint, task="chatcore",
                                  metric="score", value=chatcore)  # fmt: skip
        EvalResult.objects.create(run=finished_run, checkpoint=checkpoint, task="gsm8k",
                                  metric="accuracy", value=gsm)  # fmt: skip
        EvalResult.objects.create(run=finished_run, checkpoint=checkpoint, task="gsm8k",
                                  metric="format", value=0.99)  # fmt: skip
    html = signed_in.get(reverse("leaderboard")).content.decode()
    assert html.index("0.3000") < html.index("0.1000")  # best ChatCORE first
    assert "0.9900" not in html  # the headline metric (accuracy), not the format rate
    html = signed_in.get(reverse("leaderboard"), {"sort": "GSM8K"}).content.decode()
    assert html.index("0.5000") < html.index("0.2000")


def test_reports_pages(signed_in, finished_run, alice, make_run):
    bare = make_run(alice, Status.SUCCEEDED, name="no report")
    html = signed_in.get(reverse("reports")).content.decode()
    assert reverse("report-detail", args=[finished_run.pk]) in html and "no report" not in html
    html = signed_in.get(reverse("report-detail", args=[finished_run.pk])).content.decode()
    assert html.index("loss went down") < html.index("bpb 2.4")  # sections in order
    assert signed_in.get(reverse("report-detail", args=[bare.pk])).status_code == 404


def test_report_markdown_is_escaped_for_the_client_side_renderer(signed_in, finished_run):
    finished_run.reports.create(section="x", markdown="<script>alert(1)</script>")
    html = signed_in.get(reverse("report-detail", args=[finished_run.pk])).content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_chat_page_preselects_the_checkpoint_from_the_dashboard(signed_in, finished_run):
    checkpoint = Checkpoint.objects.filter(run=finished_run).order_by("step").first()
    html = signed_in.get(reverse("chat-page"), {"checkpoint": checkpoint.pk}).content.decode()
    assert f'value="{checkpoint.pk}" selected' in html


def test_run_kinds_read_as_words_on_every_page(signed_in, alice, make_run):
    """One wording (Kind's labels) in buttons, titles, tables and unnamed runs' names."""
    make_run(alice, Status.RUNNING, kind=Kind.BASE_EVAL, name="")
    for url in (reverse("home"), reverse("run-list")):
        html = signed_in.get(url).content.decode()
        for raw in ("New base_eval", "base_eval run", ">base_eval<", ">base pretraining run<"):
            assert raw not in html, (url, raw)
    html = signed_in.get(reverse("run-list")).content.decode()
    assert ">New base model evaluation</a>" in html and ">New whole pipeline</a>" in html
    assert "base model evaluation" in html  # the unnamed run and its kind column
    html = signed_in.get(reverse("run-new", args=["chat_eval"])).content.decode()
    assert "<title>New chat model evaluation · nanochat</title>" in html
    assert "<h1>New chat model evaluation</h1>" in html


def test_run_durations_carry_their_times_for_the_page_clock(signed_in, alice, make_run):
    running = make_run(alice, Status.RUNNING, name="ticking")
    done = make_run(alice, Status.SUCCEEDED, name="done")
    html = signed_in.get(reverse("run-list")).content.decode()
    start = f'data-started="{running.started_at.timestamp():.3f}" data-finished=""'
    assert start in html
    assert f'data-finished="{done.finished_at.timestamp():.3f}"' in html
    assert "data-server-time=" in html
    html = signed_in.get(reverse("run-detail", args=[running.pk])).content.decode()
    assert 'id="run-duration"' in html and start in html
