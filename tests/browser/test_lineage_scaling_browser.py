"""The lineage ladder and the compare page's scaling view in a real browser at 1280 px: the
deltas and the fitted exponent a user reads, the log–log charts drawn, nothing wider than the
window. Rows are made in the database (tests/browser/conftest.py's bare_site serves them)."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from runs.models import Checkpoint, EvalResult, Kind, MetricPoint, Run, RunEvent, Status
from tests.browser.test_dashboard_browser import PASSWORD, log_in, wait
from tests.browser.test_page_values_browser import overflow

pytestmark = [
    pytest.mark.services,
    pytest.mark.timeout(180),
    pytest.mark.django_db(transaction=True),
]


@pytest.fixture
def alice(django_user_model, settings):
    # The site runs the product settings: a password hasher they know.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    return django_user_model.objects.create_user("alice", password=PASSWORD)


def stage(owner, kind: str, parent=None, val_bpb=None, scores=()) -> Checkpoint:
    run = Run.objects.create(kind=kind, owner=owner, status=Status.SUCCEEDED, step=10,
                             name=f"{kind} of a rather long lineage name", parent_checkpoint=parent)  # fmt: skip
    checkpoint = Checkpoint.objects.create(run=run, stage=kind, step=10, val_bpb=val_bpb,
                                           path=f"/tmp/lineage/{run.pk}", model_config={"n_layer": 4})  # fmt: skip
    for task, metric, value in scores:
        EvalResult.objects.create(run=run, checkpoint=checkpoint, task=task, metric=metric,
                                  value=value)  # fmt: skip
    return checkpoint


def scaled_run(owner, family: str, step: int, flops_per_token: float, bpb: float) -> Run:
    run = Run.objects.create(kind=Kind.BASE, owner=owner, status=Status.SUCCEEDED, step=step,
                             name=f"{family} d{step}", config={"model": family})  # fmt: skip
    RunEvent.objects.create(run=run, seq=0, type="start", time=0.0, data={"derived": {
        "total_batch_size": 1024, "flops_per_token": flops_per_token,
        "scaling_params": flops_per_token / 6, "model": family}})  # fmt: skip
    MetricPoint.objects.create(run=run, name="val/bpb", step=step, value=bpb, time=0.0)
    return run


def test_lineage_and_scaling_show_their_numbers_at_1280px(browser, bare_site, alice):
    base = stage(alice, "base", val_bpb=1.0, scores=[("core", "centered", 0.125)])
    mid = stage(alice, "mid", base, val_bpb=0.875, scores=[("arc_easy", "accuracy", 0.25)])
    sft = stage(alice, "sft", mid, val_bpb=0.75, scores=[("arc_easy", "accuracy", 0.5),
                                                          ("gsm8k", "accuracy", 0.0625)])  # fmt: skip
    child = stage(alice, "rl", sft, scores=[("gsm8k", "accuracy", 0.125)])
    # gpt: bpb = 2·C^-0.05 exactly (C = 1024·step·flops_per_token); gpt2: two runs; one bare.
    runs = [scaled_run(alice, "gpt", step, 1e6, 2 * (1024 * step * 1e6) ** -0.05)
            for step in (100, 1000, 10000)]  # fmt: skip
    runs += [scaled_run(alice, "gpt2", s, 2e6, b) for s, b in ((100, 1.3), (1000, 1.1))]
    bare = Run.objects.create(kind=Kind.BASE, owner=alice, status=Status.SUCCEEDED, step=5)

    log_in(browser, bare_site, alice)
    browser.get(f"{bare_site.url}/checkpoints/{sft.pk}/lineage/")
    ladder = browser.find_element(By.ID, "lineage-ladder")
    rows = ladder.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [r.get_attribute("data-checkpoint") for r in rows] == [str(base.pk), str(mid.pk),
                                                                   str(sft.pk)]  # fmt: skip
    sft_row = rows[2]
    arc = sft_row.find_element(By.CSS_SELECTOR, '[data-task="ARC-Easy"] .delta')
    assert arc.text == "+0.2500" and "ok" in arc.get_attribute("class")
    bpb = rows[1].find_element(By.CSS_SELECTOR, '[data-task="val bpb"] .delta')
    assert bpb.text == "−0.1250" and "ok" in bpb.get_attribute("class")
    children = browser.find_elements(By.CSS_SELECTOR, "#lineage-children tbody tr")
    assert [c.get_attribute("data-checkpoint") for c in children] == [str(child.pk)]
    assert overflow(browser) <= 0, f"lineage is {overflow(browser)} px wider than 1280"

    ids = ",".join(str(r.pk) for r in [*runs, bare])
    browser.get(f"{bare_site.url}/runs/compare/?ids={ids}")
    wait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "body")
                            .get_attribute("data-scaling-loaded") == "1")  # fmt: skip
    fit = browser.find_element(By.CSS_SELECTOR, '#scaling-fits [data-fit="bpb/flops/gpt"]')
    exponent = fit.find_element(By.CSS_SELECTOR, "[data-exponent]")
    assert exponent.text == "−0.0500"
    assert float(exponent.get_attribute("data-exponent")) == pytest.approx(-0.05)
    assert "1.000" in fit.text  # R²
    charts = browser.find_elements(By.CSS_SELECTOR, "#scaling-charts .chart")
    drawn = {c.get_attribute("data-scaling"): c for c in charts}
    assert set(drawn) == {"bpb/flops", "bpb/params"}  # no CORE scores: no CORE charts
    assert drawn["bpb/flops"].get_attribute("data-points") == "5"
    assert drawn["bpb/flops"].find_elements(By.TAG_NAME, "canvas")
    skipped = browser.find_element(By.ID, "scaling-skipped").text
    assert "no flops_per_token in its start event" in skipped
    assert overflow(browser) <= 0, f"compare is {overflow(browser)} px wider than 1280"
