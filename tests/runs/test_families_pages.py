"""Model families on the dashboard: the family picker of the new-run form, the family shown on
the run page, runs list, leaderboard, checkpoints and compare pages and in the API, the expert
load chart of a hybrid run, and compare's tokens and FLOPs x axes."""

from __future__ import annotations

import json
import re

import pytest
from django.urls import reverse

from runs import selectors
from runs.models import Checkpoint, EvalResult, Kind, MetricPoint, Run, RunEvent, Status
from runs.programs import PROGRAMS
from training import base_train, memory
from training.memory import REFERENCE_GPU

pytestmark = pytest.mark.django_db

LABELS = {"gpt": "nanochat GPT", "gpt2": "GPT-2", "hybrid": "Hybrid (Qwen3-Next)"}


@pytest.fixture
def signed_in(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """Memory predictions are for the reference GPU, whatever this machine has."""
    monkeypatch.setattr(memory, "device_capacity", lambda device: None)


def start_event(run: Run, seq: int = 0, **derived) -> RunEvent:
    """The start event base_train writes (only the derived values these pages read)."""
    return RunEvent.objects.create(
        run=run, seq=seq, type="start", time=1_700_000_000.0 + seq, step=None,
        data={"config": run.config, "total_steps": run.total_steps, "derived": derived},
    )  # fmt: skip


def family_run(make_run, owner, model: str, **fields) -> Run:
    """A base run whose config asks for `model` (as the form or the API leaves it)."""
    config = PROGRAMS["base"].validate("tiny", {"model": model})
    return make_run(owner, Status.SUCCEEDED, config=config, **fields)


def add_checkpoint(run: Run, step: int, model: str | None) -> Checkpoint:
    config = {"n_layer": 4, "n_embd": 256, **({"model": model} if model else {})}
    return Checkpoint.objects.create(
        run=run, tokenizer=run.tokenizer, stage=Checkpoint.Stage.BASE, step=step,
        path=str(run.directory / "checkpoints"), model_config=config, val_bpb=2.5,
    )  # fmt: skip


def settings_label(html: str, name: str) -> str:
    """The opening <label> tag of a settings field."""
    match = re.search(rf'<label for="id_{name}"[^>]*>', html)
    assert match, name
    return match.group(0)


# ---- the new-run form ----------------------------------------------------------------------


def test_base_form_picks_a_family_by_its_label(signed_in):
    html = signed_in.get(reverse("run-new", args=["base"])).content.decode()
    assert 'id="family-picker"' in html and "Model family" in html
    for name, label in LABELS.items():
        assert re.search(
            rf'<input type="radio" name="model" value="{name}"[^>]*> {re.escape(label)}', html
        )
    # Nothing picked: the preset's family applies (the default when it names none).
    assert re.search(r'<input type="radio" name="model" value=""[^>]*checked', html)
    assert "the preset&#x27;s (default nanochat GPT)" in html
    assert 'data-family-default="gpt"' in html
    # The presets of the new families, with the family they pick.
    for preset in ("gpt2-small (GPT-2)", "gpt2-124m (GPT-2)", "hybrid-small (Hybrid (Qwen3-Next))"):
        assert preset in html


def test_base_form_marks_the_settings_only_some_families_read(signed_in):
    html = signed_in.get(reverse("run-new", args=["base"])).content.decode()
    assert 'data-families="gpt"' in settings_label(html, "window_pattern")
    assert 'data-families="gpt2"' in settings_label(html, "dropout")
    assert 'data-families="gpt2"' in settings_label(html, "bias")
    for name in ("layer_pattern", "num_experts", "experts_per_token", "expert_dim",
                 "delta_chunk_size", "aux_loss_coef"):  # fmt: skip
        assert 'data-families="hybrid"' in settings_label(html, name), name
    assert 'data-families="gpt hybrid"' in settings_label(html, "n_kv_head")
    # Settings every family reads show for all.
    for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "optimizer", "grad_clip"):
        assert "data-families" not in settings_label(html, name), name


def test_pipeline_form_picks_the_base_models_family(signed_in):
    html = signed_in.get(reverse("run-new", args=["pipeline"])).content.decode()
    assert "the base preset&#x27;s" in html
    for name, label in LABELS.items():
        assert re.search(
            rf'<input type="radio" name="model" value="{name}"[^>]*> {re.escape(label)}', html
        )
    assert "data-families=" not in html  # a pipeline has no family's own settings


@pytest.mark.parametrize("model", ["gpt2", "hybrid"])
def test_the_form_starts_a_run_of_the_picked_family(signed_in, ready_dataset, ready_tokenizer,
                                                   django_capture_on_commit_callbacks, model):  # fmt: skip
    data = {"name": f"{model} run", "preset": "tiny", "dataset": ready_dataset.pk,
            "tokenizer": ready_tokenizer.pk, "nproc_per_node": 1, "model": model}  # fmt: skip
    with django_capture_on_commit_callbacks():
        response = signed_in.post(reverse("run-new", args=["base"]), data)
    assert response.status_code == 302, response.content.decode()[-2000:]
    run = Run.objects.get(name=f"{model} run")
    assert run.overrides == {"model": model} and run.config["model"] == model


def expected_memory(config: dict, vocab: int) -> str:
    """What the form should say, from training.memory directly."""
    model = base_train.model_config_for(config, vocab)
    capacity = REFERENCE_GPU.capacity_bytes
    batch, estimate = memory.auto_device_batch(model, capacity_bytes=capacity)
    return f"Memory: {estimate.describe(capacity)} (reference H100-80GB: no GPU on this server), device batch {batch} (auto)"


def test_check_memory_predicts_each_family(signed_in, ready_dataset, ready_tokenizer):
    texts = {}
    for model in LABELS:
        data = {"preset": "d20", "dataset": ready_dataset.pk, "tokenizer": ready_tokenizer.pk,
                "nproc_per_node": 1, "model": model, "preview": "1"}  # fmt: skip
        response = signed_in.post(reverse("run-new", args=["base"]), data)
        html = response.content.decode()
        assert response.status_code == 200, model
        config = PROGRAMS["base"].validate("d20", {"model": model})
        texts[model] = expected_memory(config, ready_tokenizer.vocab_size)
        assert texts[model] in html, model
    assert len(set(texts.values())) == 3  # each family's own numbers
    assert not Run.objects.exists()


# ---- the family shown ----------------------------------------------------------------------


def test_run_page_shows_the_family(signed_in, alice, make_run):
    hybrid = family_run(make_run, alice, "hybrid")
    html = signed_in.get(reverse("run-detail", args=[hybrid.pk])).content.decode()
    assert re.search(
        r'id="run-model"><span class="family family-hybrid">Hybrid \(Qwen3-Next\)</span>', html
    )


def test_the_start_event_says_what_the_run_built(alice, make_run):
    # An old run's config has no `model`; its start event (or else the default) decides.
    old = make_run(alice, Status.SUCCEEDED, config={"depth": 4})
    assert selectors.run_family(old) == "gpt"
    start_event(old, model="gpt2", total_batch_size=4096)
    assert selectors.run_family(old) == "gpt2"
    # A fine-tune's start event names the family in its model_config.
    sft = make_run(alice, Status.SUCCEEDED, kind=Kind.SFT, config={})
    start_event(sft, model_config={"model": "hybrid", "n_layer": 4})
    assert [r.model_label for r in selectors.attach_families([old, sft])] == [
        "GPT-2",
        LABELS["hybrid"],
    ]


def test_runs_from_a_checkpoint_and_pipelines_have_their_models_family(alice, make_run):
    base = family_run(make_run, alice, "hybrid")
    parent = add_checkpoint(base, 100, "hybrid")
    sft = make_run(alice, kind=Kind.SFT, config={}, parent_checkpoint=parent)
    old_parent = add_checkpoint(base, 200, None)  # written before families: a GPT
    chat_eval = make_run(alice, kind=Kind.CHAT_EVAL, config={}, parent_checkpoint=old_parent)
    pipeline = make_run(alice, kind=Kind.PIPELINE,
                        config=PROGRAMS["pipeline"].validate("", {"base_preset": "gpt2-small"}))  # fmt: skip
    picked = make_run(alice, kind=Kind.PIPELINE,
                      config=PROGRAMS["pipeline"].validate("", {"model": "hybrid"}))  # fmt: skip
    tokenizer = make_run(alice, kind=Kind.TOKENIZER, config={})
    runs = selectors.attach_families([sft, chat_eval, pipeline, picked, tokenizer])
    assert [r.model_family for r in runs] == ["hybrid", "gpt", "gpt2", "hybrid", None]
    assert [r.model_label for r in runs] == [LABELS["hybrid"], "nanochat GPT", "GPT-2",
                                             LABELS["hybrid"], ""]  # fmt: skip


def test_runs_list_shows_each_runs_family(
    signed_in, alice, make_run, django_assert_max_num_queries
):
    family_run(make_run, alice, "gpt2", name="gpt2 run")
    family_run(make_run, alice, "hybrid", name="hybrid run")
    html = signed_in.get(reverse("run-list")).content.decode()
    assert re.search(
        r'gpt2 run</a> <span class="family family-gpt2" data-field="model">GPT-2</span>', html
    )
    assert re.search(
        r'hybrid run</a> <span class="family family-hybrid" data-field="model">Hybrid', html
    )
    for i in range(20):
        family_run(make_run, alice, "hybrid", name=f"more {i}")
    with django_assert_max_num_queries(12):  # one query for every row's family
        signed_in.get(reverse("run-list"))


def test_leaderboard_shows_and_filters_by_family(signed_in, alice, make_run):
    hybrid, gpt2 = family_run(make_run, alice, "hybrid"), family_run(make_run, alice, "gpt2")
    old = family_run(make_run, alice, "gpt")
    for run, model, score in ((hybrid, "hybrid", 0.31), (gpt2, "gpt2", 0.22), (old, None, 0.11)):
        checkpoint = add_checkpoint(run, 100, model)
        EvalResult.objects.create(run=run, checkpoint=checkpoint, task="core", metric="centered",
                                  value=score)  # fmt: skip
    html = signed_in.get(reverse("leaderboard"), {"sort": "CORE"}).content.decode()
    cells = re.findall(r'<span class="family family-\w+">([^<]+)</span></td>\s*<td>([\d.]+)', html)
    assert cells == [(LABELS["hybrid"], "0.3100"), ("GPT-2", "0.2200"), ("nanochat GPT", "0.1100")]
    assert "<th>Model</th>" in html
    only = signed_in.get(reverse("leaderboard"), {"sort": "CORE", "model": "gpt"}).content.decode()
    assert "0.1100" in only and "0.3100" not in only and "0.2200" not in only
    assert '<option value="gpt" selected>nanochat GPT</option>' in only
    hybrids = signed_in.get(reverse("leaderboard"), {"model": "hybrid"}).content.decode()
    assert "0.3100" in hybrids and "0.1100" not in hybrids


def test_checkpoints_page_shows_and_filters_by_family(signed_in, alice, make_run):
    run = family_run(make_run, alice, "hybrid")
    add_checkpoint(run, 100, "hybrid")
    add_checkpoint(run, 200, None)
    html = signed_in.get(reverse("checkpoints")).content.decode()
    assert '<span class="family family-hybrid">Hybrid (Qwen3-Next)</span> d4, 256 wide' in html
    assert '<span class="family family-gpt">nanochat GPT</span> d4, 256 wide' in html
    only = signed_in.get(reverse("checkpoints"), {"model": "hybrid"}).content.decode()
    assert "family-hybrid" in only and 'family-gpt"' not in only


# ---- compare -------------------------------------------------------------------------------


def test_compare_puts_runs_of_different_families_on_tokens_and_flops(signed_in, alice, make_run):
    gpt2 = family_run(make_run, alice, "gpt2", name="g2", step=999)
    hybrid = family_run(make_run, alice, "hybrid", name="hy", step=250)
    start_event(gpt2, model="gpt2", total_batch_size=4096, flops_per_token=1_200_000)
    start_event(hybrid, model="hybrid", total_batch_size=16384, flops_per_token=900_000)
    unknown = make_run(alice, Status.SUCCEEDED, name="no start", step=10)  # no start event
    ids = f"{gpt2.pk},{hybrid.pk},{unknown.pk}"
    html = signed_in.get(reverse("run-compare"), {"ids": ids}).content.decode()

    def row(name: str) -> list[str]:
        found = re.search(rf'<tr data-amount="{name}"><th>{name}</th>(.*?)</tr>', html)
        assert found, name
        return re.findall(r"<td>([^<]*)</td>", found.group(1))

    assert row("tokens per step") == ["4,096", "16,384", "–"]
    assert row("FLOPs per token") == ["1.2e+06", "9e+05", "–"]
    # 999 steps x 4,096 tokens; 250 x 16,384
    assert row("training tokens") == ["4,091,904", "4,096,000", "–"]
    # 4,091,904 x 1.2e6 = 4.91e12; 4,096,000 x 9e5 = 3.69e12
    assert row("training FLOPs") == ["4.91e+12", "3.69e+12", "–"]
    assert re.search(
        r'id="compare-models"><th>model</th><td><span class="family family-gpt2">GPT-2</span>'
        r'</td><td><span class="family family-hybrid">Hybrid \(Qwen3-Next\)</span>',
        html,
    )
    assert '<option value="step" selected>step</option>' in html
    for axis in ("tokens", "flops", "elapsed"):
        assert f'<option value="{axis}">' in html
    # ?x= opens the charts on that axis (a comparison is a link); anything else is the step.
    linked = signed_in.get(reverse("run-compare"), {"ids": ids, "x": "flops"}).content.decode()
    assert '<option value="flops" selected>training FLOPs</option>' in linked
    assert '<input type="hidden" name="x" value="flops">' in linked
    odd = signed_in.get(reverse("run-compare"), {"ids": ids, "x": "<b>"}).content.decode()
    assert '<option value="step" selected>' in odd and "<b>" not in odd
    config = json.loads(re.search(r'id="compare-config"[^>]*>(.*?)</script>', html).group(1))
    lines = {r["id"]: r for r in config["runs"]}
    assert lines[gpt2.pk]["label"] == f"#{gpt2.pk} g2 (GPT-2)"
    assert lines[gpt2.pk]["tokens_per_step"] == 4096
    assert lines[gpt2.pk]["flops_per_step"] == 4096 * 1_200_000
    assert lines[hybrid.pk]["flops_per_step"] == 16384 * 900_000
    assert lines[unknown.pk]["tokens_per_step"] is None


def test_training_scale_arithmetic():
    scale = selectors.TrainingScale(run_id=1, tokens_per_step=524_288, flops_per_token=4.9e9)
    assert scale.tokens_at(1000) == 524_288_000
    assert scale.flops_at(1000) == pytest.approx(2.569e18, rel=1e-3)
    assert scale.flops_per_step == pytest.approx(524_288 * 4.9e9)
    assert selectors.TrainingScale(run_id=2).flops_at(10) is None


def test_a_resumed_run_uses_its_latest_start(alice, make_run):
    run = family_run(make_run, alice, "gpt")
    start_event(run, 0, model="gpt", total_batch_size=1024, flops_per_token=10)
    start_event(run, 5, model="gpt", total_batch_size=2048, flops_per_token=10)
    assert selectors.training_scales([run])[run.pk].tokens_per_step == 2048


# ---- the expert load chart -----------------------------------------------------------------


def test_run_page_charts_expert_load_per_layer(signed_in, alice, make_run):
    run = family_run(make_run, alice, "hybrid")
    names = [f"moe/load_max/l{i}" for i in range(12)] + ["moe/aux_loss", "moe/load_max",
                                                          "train/loss", "train/grad_norm"]  # fmt: skip
    MetricPoint.objects.bulk_create([MetricPoint(run=run, name=n, step=s, value=1.5, time=1e9 + s)
                                     for n in names for s in range(3)])  # fmt: skip
    html = signed_in.get(reverse("run-detail", args=[run.pk])).content.decode()
    picker = re.search(r'<div id="metric-picker">(.*?)</div>', html, re.S).group(1)
    assert re.search(r'value="Expert load \(max/mean per layer\)" data-group checked', picker)
    assert 'value="moe/aux_loss" checked' in picker and 'value="train/grad_norm" checked' in picker
    assert "moe/load_max/l3" not in picker  # the layers are lines of the one chart
    config = json.loads(re.search(r'id="chart-config"[^>]*>(.*?)</script>', html).group(1))
    group = config["groups"][0]
    assert group["title"] == "Expert load (max/mean per layer)"
    assert group["names"] == [f"moe/load_max/l{i}" for i in range(12)]  # l10 after l9
    assert "Expert load (max/mean per layer)" in config["shown"]


def test_a_gpt_run_page_has_no_expert_load_chart(signed_in, finished_run):
    html = signed_in.get(reverse("run-detail", args=[finished_run.pk])).content.decode()
    assert "data-group" not in html
    config = json.loads(re.search(r'id="chart-config"[^>]*>(.*?)</script>', html).group(1))
    assert config["groups"][0]["names"] == []  # a layer reporting live still gets the chart


# ---- API -----------------------------------------------------------------------------------


def test_api_shows_the_family_of_runs_and_checkpoints(api, alice, make_run):
    run = family_run(make_run, alice, "hybrid")
    family_run(make_run, alice, "gpt2")
    hybrid_ckpt, old_ckpt = add_checkpoint(run, 100, "hybrid"), add_checkpoint(run, 200, None)
    client = api(alice)
    listed = {r["id"]: r["model"] for r in client.get("/api/runs/").json()["results"]}
    assert sorted(listed.values()) == ["gpt2", "hybrid"]
    assert client.get(f"/api/runs/{run.pk}/").json()["model"] == "hybrid"
    checkpoints = {c["id"]: c["model"] for c in client.get("/api/checkpoints/").json()["results"]}
    assert checkpoints == {hybrid_ckpt.pk: "hybrid", old_ckpt.pk: "gpt"}
    only = client.get("/api/checkpoints/", {"model": "gpt"}).json()["results"]
    assert [c["id"] for c in only] == [old_ckpt.pk]
    assert client.get("/api/checkpoints/", {"model": "llama"}).status_code == 400
