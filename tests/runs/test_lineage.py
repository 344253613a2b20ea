"""Lineage ladder: a checkpoint's chain through its runs' parent checkpoints, root first, with
each step's scores and their change from the step before, on the page and in the API."""

from __future__ import annotations

import pytest

from runs.models import Checkpoint, EvalResult, Kind, Run, Status

pytestmark = pytest.mark.django_db

OPENAPI_JSON = "application/vnd.oai.openapi+json"


def stage_checkpoint(owner, stage: str, parent=None, val_bpb=None, step=10) -> Checkpoint:
    """A succeeded run of `stage` started from `parent`, with one checkpoint."""
    run = Run.objects.create(kind=stage, owner=owner, status=Status.SUCCEEDED, name=f"{stage} run",
                             parent_checkpoint=parent, step=step)  # fmt: skip
    return Checkpoint.objects.create(run=run, stage=stage, step=step, val_bpb=val_bpb,
                                     path=f"/tmp/ckpt/{run.pk}/{stage}")  # fmt: skip


def score(checkpoint, task, value, metric="accuracy", kind=Kind.CHAT_EVAL):
    evaluator = Run.objects.create(kind=kind, status=Status.SUCCEEDED, parent_checkpoint=checkpoint)
    EvalResult.objects.create(run=evaluator, checkpoint=checkpoint, task=task, metric=metric,
                              value=value)  # fmt: skip


@pytest.fixture
def ladder(alice):
    """base → mid → sft → rl, each scored; the SFT also has a second child (another RL)."""
    base = stage_checkpoint(alice, "base", val_bpb=1.0)
    score(base, "core", 0.125, metric="centered", kind=Kind.BASE_EVAL)
    mid = stage_checkpoint(alice, "mid", base, val_bpb=0.875)
    score(mid, "arc_easy", 0.25)
    sft = stage_checkpoint(alice, "sft", mid, val_bpb=0.75)
    score(sft, "arc_easy", 0.5)
    score(sft, "gsm8k", 0.0625)
    rl = stage_checkpoint(alice, "rl", sft)
    score(rl, "gsm8k", 0.125)
    other = stage_checkpoint(alice, "rl", sft)
    return base, mid, sft, rl, other


def test_api_lineage_is_the_chain_root_first_with_deltas(api, alice, ladder):
    base, mid, sft, rl, _ = ladder
    body = api(alice).get(f"/api/checkpoints/{rl.pk}/lineage/").json()
    assert [s["checkpoint"]["id"] for s in body["steps"]] == [base.pk, mid.pk, sft.pk, rl.pk]
    assert body["tasks"] == ["CORE", "ARC-Easy", "GSM8K"]
    steps = body["steps"]
    assert steps[0]["deltas"] == {} and steps[0]["val_bpb_delta"] is None
    assert steps[1]["val_bpb_delta"] == pytest.approx(-0.125)
    assert steps[1]["deltas"] == {"CORE": None, "ARC-Easy": None}
    assert steps[2]["deltas"]["ARC-Easy"] == pytest.approx(0.25)
    assert steps[3]["scores"] == {"GSM8K": 0.125}
    assert steps[3]["deltas"]["GSM8K"] == pytest.approx(0.0625)
    assert steps[3]["val_bpb_delta"] is None  # RL saved no val bpb
    assert body["children"] == [] and body["truncated"] is False


def test_children_are_the_runs_started_from_it(api, alice, ladder):
    _, _, sft, rl, other = ladder
    Checkpoint.objects.create(run=rl.run, stage="rl", step=5, path=rl.path)  # an earlier step
    body = api(alice).get(f"/api/checkpoints/{sft.pk}/lineage/").json()
    assert [c["id"] for c in body["children"]] == [rl.pk, other.pk]


def test_a_cycle_ends_the_walk(api, alice):
    one = stage_checkpoint(alice, "sft")
    two = stage_checkpoint(alice, "rl", one)
    Run.objects.filter(pk=one.run_id).update(parent_checkpoint=two)  # hand-edited rows
    body = api(alice).get(f"/api/checkpoints/{two.pk}/lineage/").json()
    assert [s["checkpoint"]["id"] for s in body["steps"]] == [one.pk, two.pk]
    assert body["truncated"] is True


def test_a_long_chain_is_bounded(api, alice):
    from runs.lineage import MAX_DEPTH

    checkpoint = stage_checkpoint(alice, "base")
    for _ in range(MAX_DEPTH + 2):
        checkpoint = stage_checkpoint(alice, "sft", checkpoint)
    body = api(alice).get(f"/api/checkpoints/{checkpoint.pk}/lineage/").json()
    assert len(body["steps"]) == MAX_DEPTH and body["truncated"] is True
    assert body["steps"][-1]["checkpoint"]["id"] == checkpoint.pk


def test_page_shows_the_ladder_and_children(client, alice, ladder):
    base, mid, sft, rl, other = ladder
    client.force_login(alice)
    html = client.get(f"/checkpoints/{sft.pk}/lineage/").content.decode()
    for checkpoint in (base, mid, sft, rl, other):
        assert f'data-checkpoint="{checkpoint.pk}"' in html
    assert "+0.2500" in html  # ARC-Easy, mid → SFT
    assert "−0.1250" in html  # val bpb, base → mid
    assert client.get("/checkpoints/999999/lineage/").status_code == 404


def test_pages_link_to_the_lineage(client, alice, ladder):
    _, _, sft, _, _ = ladder
    client.force_login(alice)
    link = f"/checkpoints/{sft.pk}/lineage/"
    assert link in client.get("/checkpoints/").content.decode()
    assert link in client.get(f"/runs/{sft.run_id}/").content.decode()
    assert link in client.get(f"/chat/?checkpoint={sft.pk}").content.decode()  # the model card


def test_signed_in_users_only_like_the_checkpoints(client, api, alice, ladder):
    sft = ladder[2]
    page = client.get(f"/checkpoints/{sft.pk}/lineage/")
    assert page.status_code == 302 and "/login/" in page["Location"]
    assert client.get("/checkpoints/").status_code == 302
    for path in (f"/api/checkpoints/{sft.pk}/lineage/", f"/api/checkpoints/{sft.pk}/"):
        assert api().get(path).status_code == 403
    assert api(alice, token=True).get(f"/api/checkpoints/{sft.pk}/lineage/").status_code == 200
    assert api(alice).get("/api/checkpoints/999999/lineage/").status_code == 404


def test_schema_documents_the_lineage(api, alice):
    schema = api(alice).get("/api/schema/", HTTP_ACCEPT=OPENAPI_JSON).json()
    get = schema["paths"]["/api/checkpoints/{id}/lineage/"]["get"]
    assert {"200", "401", "403", "404"} <= set(get["responses"])
    ref = get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/Lineage")
    steps = schema["components"]["schemas"]["LineageStep"]["properties"]
    assert {"checkpoint", "scores", "deltas", "val_bpb_delta"} <= set(steps)
