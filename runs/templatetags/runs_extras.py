"""Small formatting filters of the dashboard templates (durations, scores, percentages, the
names of run kinds)."""

from __future__ import annotations

import math

from django import template

from runs import selectors
from runs.admin import human_duration

register = template.Library()


@register.filter
def duration(seconds) -> str:
    """1h 02m, 3m 05s, 42s; a dash when unknown."""
    return "–" if seconds is None else human_duration(float(seconds))


@register.filter
def kind_label(kind) -> str:
    """'base model evaluation' for 'base_eval' (selectors.kind_label: one wording everywhere)."""
    return selectors.kind_label(kind)


@register.filter
def timestamp(when) -> str:
    """A datetime as Unix seconds for data attributes the page's clock reads; '' when None."""
    return "" if when is None else f"{when.timestamp():.3f}"


@register.filter
def score(value, digits: int = 4) -> str:
    """A metric with a fixed number of decimals; a dash when missing or not finite."""
    if value is None or isinstance(value, bool):
        return "–"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return "–"
    return f"{number:.{int(digits)}f}"


@register.filter
def percent(fraction) -> str:
    """0.4213 -> 42%; used as a width too, so always a plain number with %."""
    try:
        return f"{max(0.0, min(1.0, float(fraction))) * 100:.0f}%"
    except (TypeError, ValueError):
        return "0%"


@register.filter
def filesize(size) -> str:
    if size is None:
        return "–"
    size = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


@register.filter
def get(mapping, key):
    """mapping[key] in a template (dict lookups by a variable key)."""
    try:
        return mapping[key]
    except (KeyError, IndexError, TypeError):
        return None


@register.filter
def signed(value, digits: int = 4) -> str:
    """A change with its sign (+0.0310, −0.0120); a dash when missing: deltas read at a glance."""
    text = score(value, digits)
    if text == "–":
        return text
    number = float(value)
    return ("+" if number >= 0 else "−") + text.lstrip("-")


@register.filter
def sci(value) -> str:
    """Three significant digits (4.91e+12, 0.0513) for fitted coefficients and FLOPs."""
    return "–" if value is None else f"{float(value):.3g}"


@register.filter
def signed_percent(fraction) -> str:
    """A relative residual as a signed percentage (+3.1 %)."""
    if fraction is None:
        return "–"
    return signed(float(fraction) * 100, 1) + " %"
