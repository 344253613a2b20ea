"""The admin: every page opens with data present, search/filters work, cancel goes through the
service, the big tables never count past their cap, and only staff get in."""

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from runs import admin as runs_admin
from runs.models import (
    ArtifactStatus,
    Checkpoint,
    Dataset,
    EvalResult,
    Kind,
    MetricPoint,
    Report,
    Run,
    RunEvent,
    Sample,
    Status,
    Tokenizer,
)

pytestmark = pytest.mark.django_db

MODELS = [Dataset, Tokenizer, Run, RunEvent, MetricPoint, Checkpoint, EvalResult, Sample, Report]


@pytest.fixture
def data(tmp_path, admin_user):
    """One of everything, linked the way a finished base run leaves them."""
    dataset = Dataset.objects.create(
        name="tiny", source=Dataset.Source.BUILTIN, path=str(tmp_path / "data"),
        status=ArtifactStatus.READY, shards=3, documents=120, characters=50_000,
        bytes_on_disk=3 * 1024 * 1024,
    )  # fmt: skip
    tokenizer = Tokenizer.objects.create(
        name="tok-512", dataset=dataset, path=str(tmp_path / "tok"), vocab_size=512,
        status=ArtifactStatus.READY, stats={"bytes_per_token/news": 3.2},
    )  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.txt").write_text("hello\n")
    now = timezone.now()
    run = Run.objects.create(
        name="d4 base", kind=Kind.BASE, owner=admin_user, dataset=dataset, tokenizer=tokenizer,
        status=Status.SUCCEEDED, step=200, total_steps=400, progress=0.5, best_val_bpb=1.23456,
        started_at=now - timezone.timedelta(seconds=3725), finished_at=now, run_dir=str(run_dir),
        config={"depth": 4}, host="gpu-7",
    )  # fmt: skip
    checkpoint = Checkpoint.objects.create(
        run=run, tokenizer=tokenizer, stage="base", step=200, path=str(run_dir / "ckpt"),
        model_config={"n_layer": 4}, val_bpb=1.25, size_bytes=5 * 1024 * 1024,
    )  # fmt: skip
    RunEvent.objects.create(run=run, seq=0, type="start", time=1.0, data={"total_steps": 400})
    RunEvent.objects.create(run=run, seq=1, type="metrics", time=2.0, step=1, data={})
    MetricPoint.objects.create(run=run, name="train/loss", step=1, value=4.5, time=2.0)
    MetricPoint.objects.create(run=run, name="val/bpb", step=1, value=None, time=2.0)
    EvalResult.objects.create(run=run, checkpoint=checkpoint, task="arc", metric="acc", value=0.3)
    Sample.objects.create(run=run, step=200, prompt="The sky is", completion=" blue.")
    Report.objects.create(run=run, section="Summary", markdown="# Base\nloss went down")
    return {
        Dataset: dataset, Tokenizer: tokenizer, Run: run, Checkpoint: checkpoint,
        RunEvent: RunEvent.objects.first(), MetricPoint: MetricPoint.objects.first(),
        EvalResult: EvalResult.objects.get(), Sample: Sample.objects.get(),
        Report: Report.objects.get(),
    }  # fmt: skip


@pytest.fixture
def staff_client(client, admin_user):
    client.force_login(admin_user)
    return client


def changelist(model) -> str:
    return reverse(f"admin:runs_{model._meta.model_name}_changelist")


def change(obj) -> str:
    return reverse(f"admin:runs_{obj._meta.model_name}_change", args=[obj.pk])


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_staff_opens_every_changelist(staff_client, data, model):
    response = staff_client.get(changelist(model))
    assert response.status_code == 200
    assert data[model] in list(response.context["cl"].result_list)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_staff_opens_every_change_page(staff_client, data, model):
    assert staff_client.get(change(data[model])).status_code == 200


def test_run_list_shows_summary_columns(staff_client, data):
    html = staff_client.get(changelist(Run)).content.decode()
    assert "50%" in html
    assert "200 / 400" in html
    assert "1.2346" in html
    assert "1h 02m" in html


def test_run_and_checkpoint_lists_show_the_model_family(staff_client, data):
    checkpoint = data[Checkpoint]
    # A checkpoint from before families (no `model` in its config) is a nanochat GPT.
    assert "nanochat GPT" in staff_client.get(changelist(Checkpoint)).content.decode()
    checkpoint.model_config = {**(checkpoint.model_config or {}), "model": "hybrid"}
    checkpoint.save(update_fields=["model_config"])
    assert "Hybrid (Qwen3-Next)" in staff_client.get(changelist(Checkpoint)).content.decode()
    data[Run].config = {**data[Run].config, "model": "gpt2"}
    data[Run].save(update_fields=["config"])
    assert "GPT-2" in staff_client.get(changelist(Run)).content.decode()


def test_run_page_links_its_files_and_rows(staff_client, data):
    run = data[Run]
    html = staff_client.get(change(run)).content.decode()
    assert reverse("run-file", args=[run.pk, "log.txt"]) in html
    # events.jsonl was never written, so there is nothing to link to
    assert reverse("run-file", args=[run.pk, "events.jsonl"]) not in html
    assert f"{changelist(MetricPoint)}?run__id__exact={run.pk}" in html
    assert "step 200" in html  # the checkpoint inline
    assert "Summary" in html  # the report inline


def test_checkpoint_page_shows_size_and_directory(staff_client, data):
    html = staff_client.get(change(data[Checkpoint])).content.decode()
    assert "5.0\xa0MB" in html
    assert data[Checkpoint].path in html
    assert "missing on this machine" in html


def test_worker_written_run_fields_are_read_only(staff_client, data):
    run = data[Run]
    form = staff_client.get(change(run)).context["adminform"].form
    assert set(form.fields) == {"name", "owner"}


def test_search_runs_by_name_and_by_id(staff_client, data):
    other = Run.objects.create(name="tokenizer run", kind=Kind.TOKENIZER)
    by_name = staff_client.get(changelist(Run), {"q": "d4"}).context["cl"].result_list
    assert list(by_name) == [data[Run]]
    by_id = staff_client.get(changelist(Run), {"q": str(other.pk)}).context["cl"].result_list
    assert other in list(by_id)


def test_filter_runs_by_status_and_kind(staff_client, data):
    queued = Run.objects.create(name="waiting", kind=Kind.SFT)
    by_status = staff_client.get(changelist(Run), {"status__exact": "queued"}).context["cl"]
    assert list(by_status.result_list) == [queued]
    by_kind = staff_client.get(changelist(Run), {"kind__exact": "base"}).context["cl"]
    assert list(by_kind.result_list) == [data[Run]]


def test_filter_metric_points_by_run_and_search_by_name_prefix(staff_client, data):
    other = Run.objects.create(kind=Kind.BASE)
    MetricPoint.objects.create(run=other, name="train/loss", step=1, value=1.0, time=1.0)
    cl = staff_client.get(changelist(MetricPoint), {"run__id__exact": data[Run].pk}).context["cl"]
    assert {p.run_id for p in cl.result_list} == {data[Run].pk}
    cl = staff_client.get(changelist(MetricPoint), {"q": "val/"}).context["cl"]
    assert [p.name for p in cl.result_list] == ["val/bpb"]


def test_filter_events_by_type(staff_client, data):
    cl = staff_client.get(changelist(RunEvent), {"type": "start"}).context["cl"]
    assert [e.type for e in cl.result_list] == ["start"]


def test_big_tables_count_no_further_than_their_cap(staff_client, data, monkeypatch):
    run = data[Run]
    MetricPoint.objects.bulk_create(
        MetricPoint(run=run, name="train/lr", step=i, value=0.1, time=float(i)) for i in range(30)
    )
    monkeypatch.setattr(runs_admin.MetricPointAdmin, "count_cap", 10)
    monkeypatch.setattr(runs_admin.MetricPointAdmin, "list_per_page", 5)
    cl = staff_client.get(changelist(MetricPoint)).context["cl"]
    assert cl.result_count == 10
    assert cl.full_result_count is None
    assert len(cl.result_list) == 5


@pytest.mark.parametrize("model", [RunEvent, MetricPoint], ids=lambda m: m.__name__)
def test_big_tables_never_count_or_join_the_whole_table(staff_client, data, model):
    table = model._meta.db_table
    with CaptureQueriesContext(connection) as queries:
        assert staff_client.get(changelist(model)).status_code == 200
    on_table = [q["sql"] for q in queries.captured_queries if f'"{table}"' in q["sql"]]
    counts = [sql for sql in on_table if "COUNT(" in sql]
    assert counts and all("LIMIT" in sql for sql in counts)
    assert not any("JOIN" in sql for sql in on_table)


def test_big_tables_are_view_only(staff_client, data):
    for model in (RunEvent, MetricPoint):
        assert (
            staff_client.get(reverse(f"admin:runs_{model._meta.model_name}_add")).status_code == 403
        )
        response = staff_client.post(change(data[model]), {"name": "changed"})
        assert response.status_code == 403


def test_cancel_action_cancels_queued_and_warns_on_finished(staff_client, data):
    queued = Run.objects.create(name="waiting", kind=Kind.BASE)
    finished = data[Run]
    response = staff_client.post(
        changelist(Run),
        {"action": "cancel_runs", "_selected_action": [queued.pk, finished.pk]},
    )
    assert response.status_code == 302
    queued.refresh_from_db()
    assert queued.status == Status.CANCELLED
    finished.refresh_from_db()
    assert finished.status == Status.SUCCEEDED
    sent = {(m.level_tag, m.message) for m in get_messages(response.wsgi_request)}
    assert ("success", f"Run {queued.pk}: cancelled.") in sent
    assert any(level == "warning" and f"Run {finished.pk}:" in text for level, text in sent)


def test_cancel_action_asks_a_running_runs_worker(staff_client, data):
    running = Run.objects.create(name="busy", kind=Kind.BASE, status=Status.RUNNING)
    response = staff_client.post(
        changelist(Run), {"action": "cancel_runs", "_selected_action": [running.pk]}
    )
    assert response.status_code == 302
    running.refresh_from_db()
    assert running.cancel_requested
    assert running.status == Status.RUNNING


def test_staff_with_run_change_permission_may_cancel(client, data, django_user_model):
    """Not only superusers: staff with the change permission get the action (any run)."""
    user = django_user_model.objects.create_user("helper", password="pw", is_staff=True)
    user.user_permissions.add(*_run_permissions("view_run", "change_run"))
    client.force_login(user)
    queued = Run.objects.create(name="waiting", kind=Kind.BASE, owner=data[Run].owner)
    response = client.post(
        changelist(Run), {"action": "cancel_runs", "_selected_action": [queued.pk]}
    )
    assert response.status_code == 302
    queued.refresh_from_db()
    assert queued.status == Status.CANCELLED


def test_view_only_staff_do_not_get_the_cancel_action(client, data, django_user_model):
    user = django_user_model.objects.create_user("watcher", password="pw", is_staff=True)
    user.user_permissions.add(*_run_permissions("view_run"))
    client.force_login(user)
    response = client.get(changelist(Run))
    assert response.status_code == 200
    assert "cancel_runs" not in response.content.decode()
    queued = Run.objects.create(name="waiting", kind=Kind.BASE)
    client.post(changelist(Run), {"action": "cancel_runs", "_selected_action": [queued.pk]})
    queued.refresh_from_db()
    assert queued.status == Status.QUEUED


def _run_permissions(*codenames):
    from django.contrib.auth.models import Permission

    return Permission.objects.filter(content_type__app_label="runs", codename__in=codenames)


@pytest.mark.parametrize("model", [Run, MetricPoint], ids=lambda m: m.__name__)
def test_non_staff_is_sent_to_the_admin_login(client, data, django_user_model, model):
    user = django_user_model.objects.create_user("plain", password="pw-for-tests")
    client.force_login(user)
    response = client.get(changelist(model))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_human_duration():
    assert runs_admin.human_duration(None) == "—"
    assert runs_admin.human_duration(41.7) == "41s"
    assert runs_admin.human_duration(125) == "2m 05s"
    assert runs_admin.human_duration(3 * 3600 + 4 * 60 + 5) == "3h 04m"
