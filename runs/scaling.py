"""Scaling view: power laws fitted per model family to runs' final numbers.

Pure numpy, no Django: the compare page and its tests hand in `Point`s (runs/selectors.py's
`scaling_points` reads them from the database) and get back fits, residuals and the chart data.
A power law y = a·x^b is a straight line on log–log axes, so the fit is ordinary least squares
of log y on log x; R² is measured there too, as that is the space the line was fitted in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# What is fitted: (key, label) of the y values and of the x values.
METRICS = (("bpb", "val bpb"), ("core", "CORE"))
AXES = (("flops", "training FLOPs"), ("params", "parameters"))


@dataclass(frozen=True)
class PowerLaw:
    """y = a·x^b fitted to n points; r2 on log–log (None when every y is the same)."""

    a: float
    b: float
    r2: float | None
    n: int

    def predict(self, x: float) -> float:
        return self.a * x**self.b

    def residual(self, x: float, y: float) -> float:
        """How far y is from the law, relative to it (0.05: 5 % above the line)."""
        return y / self.predict(x) - 1.0


def fit_power_law(xs, ys) -> PowerLaw | None:
    """Least squares on (log x, log y); None when the points cannot pin a line down (fewer
    than two distinct x, or a value that is not positive and finite)."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.size < 2 or not (_usable(x) and _usable(y)):
        return None
    lx, ly = np.log(x), np.log(y)
    if np.ptp(lx) == 0:
        return None
    b, intercept = np.polyfit(lx, ly, 1)
    fitted = intercept + b * lx
    total = float(np.sum((ly - ly.mean()) ** 2))
    r2 = None if total == 0 else 1.0 - float(np.sum((ly - fitted) ** 2)) / total
    return PowerLaw(a=float(math.exp(intercept)), b=float(b), r2=r2, n=int(x.size))


def _usable(values: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(values)) and np.all(values > 0))


@dataclass
class Point:
    """One run's numbers; None where it has none. `missing` says why, in words a user reads
    (the selector knows which field of the start event was absent)."""

    run_id: int
    label: str
    family: str
    flops: float | None = None
    params: float | None = None
    bpb: float | None = None
    core: float | None = None
    missing: list[str] = field(default_factory=list)

    def value(self, key: str) -> float | None:
        value = getattr(self, key)
        return value if value is not None and math.isfinite(value) and value > 0 else None


@dataclass
class Fit:
    """The power law of one family for one (metric, axis), or None with fewer than 2 runs."""

    metric: str
    axis: str
    family: str
    points: list[Point]
    law: PowerLaw | None


@dataclass
class ScalingView:
    fits: list[Fit]
    # {run id: {"bpb/flops": relative residual, ...}} for the fits the run is part of.
    residuals: dict[int, dict[str, float]]
    skipped: list[tuple[Point, list[str]]]  # runs missing a number, with the reasons
    points: list[Point]


def scaling_view(points: list[Point]) -> ScalingView:
    """Every family's fit for every (metric, axis), each run's residuals, and what is skipped.

    A number that is not positive (a centered CORE below chance, say) has no logarithm: such a
    run is left out of that chart and says so."""
    fits: list[Fit] = []
    residuals: dict[int, dict[str, float]] = {p.run_id: {} for p in points}
    reasons: dict[int, list[str]] = {p.run_id: list(p.missing) for p in points}
    for metric, label in METRICS:
        for p in points:
            raw = getattr(p, metric)
            if raw is not None and p.value(metric) is None:
                reasons[p.run_id].append(f"{label} {raw:.4g} is not positive (no log)")
        for axis, _ in AXES:
            usable = [p for p in points if p.value(metric) and p.value(axis)]
            for family in sorted({p.family for p in usable}):
                members = [p for p in usable if p.family == family]
                law = fit_power_law([p.value(axis) for p in members],
                                    [p.value(metric) for p in members])  # fmt: skip
                fits.append(Fit(metric, axis, family, members, law))
                if law is not None:
                    for p in members:
                        key = f"{metric}/{axis}"
                        residuals[p.run_id][key] = law.residual(p.value(axis), p.value(metric))
    skipped = [(p, reasons[p.run_id]) for p in points if reasons[p.run_id]]
    return ScalingView(fits=fits, residuals=residuals, skipped=skipped, points=points)


def chart_data(view: ScalingView) -> list[dict]:
    """One chart per (metric, axis) that has points: per family its points and, where fitted,
    the law drawn between its smallest and largest x (what static/js/scaling.js plots)."""
    charts = []
    for metric, metric_label in METRICS:
        for axis, axis_label in AXES:
            families = []
            for fit in (f for f in view.fits if (f.metric, f.axis) == (metric, axis)):
                xs = [p.value(axis) for p in fit.points]
                ys = [p.value(metric) for p in fit.points]
                line = None
                if fit.law is not None:
                    ends = [min(xs), max(xs)]
                    line = {"x": ends, "y": [fit.law.predict(x) for x in ends]}
                families.append({"family": fit.family, "x": xs, "y": ys, "fit": line,
                                 "runs": [p.label for p in fit.points]})  # fmt: skip
            if families:
                charts.append({"metric": metric, "axis": axis, "title":
                               f"{metric_label} vs {axis_label}", "x_label": axis_label,
                               "y_label": metric_label, "families": families})  # fmt: skip
    return charts
