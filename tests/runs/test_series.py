"""Metric series for charts: downsampling keeps the shape, series() reads the rows."""

import math

import numpy as np
import pytest

from runs.models import Kind, MetricPoint, Run
from runs.series import downsample, metric_names, series


def noisy(n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(4.0 * np.exp(-np.arange(n) / 2000) + rng.normal(0, 0.05, n))


@pytest.mark.parametrize("n", [0, 1, 2, 999, 1000])
def test_short_series_are_kept_whole(n):
    assert list(downsample(range(n), [1.0] * n, 1000)) == list(range(n))


@pytest.mark.parametrize(("n", "max_points"), [(5000, 1000), (1001, 1000), (50_000, 7), (10, 4)])
def test_long_series_keep_first_last_and_fit(n, max_points):
    keep = downsample(range(n), noisy(n), max_points)
    assert keep[0] == 0 and keep[-1] == n - 1
    assert len(keep) <= max_points
    assert all(np.diff(keep) > 0)  # in order, no index twice


def test_spikes_and_dips_survive():
    values = noisy(20_000)
    values[7777] = 50.0  # a loss spike
    values[12345] = -3.0
    keep = downsample(range(len(values)), values, 200)
    assert 7777 in keep and 12345 in keep


def test_the_global_min_and_max_are_kept():
    values = noisy(30_000, seed=3)
    keep = set(downsample(range(len(values)), values, 500))
    assert int(np.argmin(values)) in keep
    assert int(np.argmax(values)) in keep


def test_nulls_are_neither_minimum_nor_maximum():
    values = [None if i % 2 else float(i % 97) for i in range(4000)]
    keep = downsample(range(len(values)), values, 100)
    inner = keep[1:-1]
    assert all(values[i] is not None for i in inner)
    assert len(keep) <= 100


def test_an_all_null_series_still_downsamples():
    keep = downsample(range(3000), [None] * 3000, 50)
    assert keep[0] == 0 and keep[-1] == 2999 and len(keep) <= 50


def test_two_points_is_the_least_one_may_ask_for():
    assert list(downsample(range(10), [1.0] * 10, 2)) == [0, 9]
    with pytest.raises(ValueError):
        downsample(range(10), [1.0] * 10, 1)


# ---- reading the rows ---------------------------------------------------------------------


@pytest.fixture
def run(db):
    run = Run.objects.create(kind=Kind.BASE)
    other = Run.objects.create(kind=Kind.BASE)
    MetricPoint.objects.bulk_create(
        [MetricPoint(run=run, name="train/loss", step=s, value=10.0 - s / 100, time=1000.0 + s)
         for s in range(1, 501)]
        + [MetricPoint(run=run, name="val/bpb", step=s, value=None if s == 200 else 2.0,
                       time=2000.0 + s) for s in (100, 200, 300)]
        + [MetricPoint(run=other, name="other/metric", step=1, value=1.0, time=1.0)]
    )  # fmt: skip
    return run


def test_metric_names_lists_this_runs_names(run):
    assert metric_names(run.pk) == ["train/loss", "val/bpb"]


def test_series_returns_points_in_step_order_with_the_total(run):
    result = series(run.pk, ["val/bpb", "missing"])
    assert result["val/bpb"] == {
        "step": [100, 200, 300], "value": [2.0, None, 2.0],
        "time": [2100.0, 2200.0, 2300.0], "total": 3,
    }  # fmt: skip
    assert result["missing"] == {"step": [], "value": [], "time": [], "total": 0}


def test_series_downsamples_long_curves(run):
    loss = series(run.pk, ["train/loss"], max_points=50)["train/loss"]
    assert loss["total"] == 500
    assert len(loss["step"]) <= 50
    assert loss["step"][0] == 1 and loss["step"][-1] == 500
    assert loss["step"] == sorted(loss["step"])
    assert all(
        math.isclose(v, 10.0 - s / 100) for s, v in zip(loss["step"], loss["value"], strict=True)
    )


def test_series_after_step_returns_only_newer_points(run):
    loss = series(run.pk, ["train/loss"], after_step=495)["train/loss"]
    assert loss["step"] == [496, 497, 498, 499, 500]
    assert loss["total"] == 5
