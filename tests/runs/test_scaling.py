"""Scaling view: the power-law fit recovers known exponents, and the selectors read each run's
training FLOPs (step × total_batch_size × flops_per_token) and parameters from its rows."""

from __future__ import annotations

import re

import numpy as np
import pytest

from runs import scaling, selectors
from runs.models import EvalResult, MetricPoint, RunEvent, Status
from tests.runs.conftest import add_checkpoint


def test_fit_recovers_an_exact_power_law():
    xs = np.logspace(15, 20, 6)
    law = scaling.fit_power_law(xs, 3.5 * xs**-0.07)
    assert law.b == pytest.approx(-0.07, abs=1e-9)
    assert law.a == pytest.approx(3.5, rel=1e-6)
    assert law.r2 == pytest.approx(1.0) and law.n == 6
    assert law.residual(1e17, law.predict(1e17) * 1.1) == pytest.approx(0.1)


def test_fit_recovers_the_exponent_through_noise():
    rng = np.random.default_rng(17)
    xs = np.logspace(6, 9, 200)
    ys = 0.02 * xs**0.35 * np.exp(rng.normal(0, 0.05, xs.size))
    law = scaling.fit_power_law(xs, ys)
    assert law.b == pytest.approx(0.35, abs=0.01)
    assert law.a == pytest.approx(0.02, rel=0.2)
    assert 0.9 < law.r2 < 1.0


@pytest.mark.parametrize(
    ("xs", "ys"),
    [([1e3], [2.0]), ([1e3, 1e3], [2.0, 3.0]), ([1e3, 1e4], [2.0, -1.0]), ([0, 1e4], [1, 2])],
)
def test_no_fit_without_two_distinct_positive_points(xs, ys):
    assert scaling.fit_power_law(xs, ys) is None


def test_view_fits_each_family_and_says_what_is_skipped():
    points = [
        scaling.Point(1, "#1", "gpt", flops=1e15, params=1e6, bpb=1.2, core=0.1),
        scaling.Point(2, "#2", "gpt", flops=1e17, params=1e7, bpb=1.0, core=0.2),
        scaling.Point(3, "#3", "gpt2", flops=1e16, params=2e6, bpb=1.1, core=-0.05),
        scaling.Point(
            4, "#4", "hybrid", bpb=1.3, missing=["no flops_per_token in its start event"]
        ),
    ]
    view = scaling.scaling_view(points)
    fits = {(f.metric, f.axis, f.family): f for f in view.fits}
    assert fits["bpb", "flops", "gpt"].law.b == pytest.approx(np.log(1.0 / 1.2) / np.log(100))
    assert fits["bpb", "flops", "gpt2"].law is None  # one run: no line
    assert ("core", "flops", "gpt2") not in fits  # a CORE below chance has no logarithm
    assert view.residuals[1]["bpb/flops"] == pytest.approx(0.0, abs=1e-9)
    skipped = {p.run_id: reasons for p, reasons in view.skipped}
    assert skipped[4] == ["no flops_per_token in its start event"]
    assert "CORE -0.05 is not positive (no log)" in skipped[3]
    titles = [c["title"] for c in scaling.chart_data(view)]
    assert titles == [
        "val bpb vs training FLOPs", "val bpb vs parameters",
        "CORE vs training FLOPs", "CORE vs parameters",
    ]  # fmt: skip


def start(run, **derived):
    RunEvent.objects.create(run=run, seq=0, type="start", time=0.0, data={"derived": derived})


@pytest.mark.django_db
def test_selectors_compute_flops_and_parameters(alice, make_run):
    base = make_run(alice, Status.SUCCEEDED, step=100, best_val_bpb=1.5)
    start(base, total_batch_size=4096, flops_per_token=3e6, scaling_params=500_000,
          parameters={"total": 600_000}, model="gpt2")  # fmt: skip
    MetricPoint.objects.create(run=base, name="val/bpb", step=50, value=1.4, time=0.0)
    MetricPoint.objects.create(run=base, name="val/bpb", step=100, value=1.25, time=1.0)
    checkpoint = add_checkpoint(base, 100)
    EvalResult.objects.create(run=base, checkpoint=checkpoint, task="core", metric="centered",
                              value=0.125)  # fmt: skip
    tuned = make_run(alice, Status.SUCCEEDED, step=10, best_val_bpb=0.9)
    start(tuned, total_batch_size=1000, flops_per_token=2e6, parameters={"total": 700_000})
    bare = make_run(alice, Status.SUCCEEDED, step=5)
    start(bare, total_batch_size=1000)

    runs = selectors.attach_families([base, tuned, bare])
    points = {p.run_id: p for p in selectors.scaling_points(runs)}
    assert points[base.pk].flops == 100 * 4096 * 3e6
    assert points[base.pk].params == 500_000  # the scaling count, not the total
    assert points[base.pk].bpb == 1.25 and points[base.pk].core == 0.125
    assert points[base.pk].family == "gpt2" and points[base.pk].missing == []
    assert points[tuned.pk].flops == 10 * 1000 * 2e6 and points[tuned.pk].params == 700_000
    assert points[tuned.pk].bpb == 0.9  # no val/bpb points: the best it recorded
    assert points[tuned.pk].missing == ["no CORE score"]
    assert points[bare.pk].flops is None and points[bare.pk].params is None
    assert "no flops_per_token in its start event" in points[bare.pk].missing
    assert "no parameter count in its start event" in points[bare.pk].missing


@pytest.mark.django_db
def test_compare_page_shows_fits_residuals_and_skipped_runs(client, alice, make_run):
    runs = []
    for step, bpb in ((100, 1.2), (1000, 1.0)):
        run = make_run(alice, Status.SUCCEEDED, step=step)
        start(run, total_batch_size=1000, flops_per_token=1e6, scaling_params=1e6)
        MetricPoint.objects.create(run=run, name="val/bpb", step=step, value=bpb, time=0.0)
        runs.append(run)
    bare = make_run(alice, Status.SUCCEEDED, step=3)
    client.force_login(alice)
    ids = ",".join(str(r.pk) for r in [*runs, bare])
    html = client.get(f"/runs/compare/?ids={ids}").content.decode()
    shown = re.findall(r'data-exponent="([^"]+)">([^<]+)<', html)
    assert len(shown) == 1  # one family, val bpb vs FLOPs (no parameters differ, no CORE)
    assert float(shown[0][0]) == pytest.approx(np.log(1.0 / 1.2) / np.log(10))
    assert shown[0][1] == "−0.0792"
    assert f'<li data-run="{bare.pk}">' in html and "no flops_per_token" in html
    assert 'id="scaling-data"' in html and "val bpb vs training FLOPs" in html
