"""The arithmetic of alerts, as pure functions: when a rule fires, what the message says, how
long to wait before the next attempt. No database here, so all of it is tested in microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

# A run's final status -> the event a user may ask to hear about (Notification.Event values).
END_EVENTS = {"succeeded": "run.succeeded", "failed": "run.failed", "cancelled": "run.cancelled"}
BELOW, ABOVE = "below", "above"
# Metric values named in a run-end message and in the payload's `run.metrics`.
HEADLINE_METRICS = ("train/loss", "val/bpb", "core", "chatcore")
ERROR_CHARS = 300  # of a failed run's error, in the one-line message
NAME_CHARS = 120


def crosses(value: float | None, comparison: str, threshold: float) -> bool:
    """Whether one value is past the threshold (strictly); a missing or NaN value never is."""
    if value is None or not math.isfinite(value):
        return False
    return value < threshold if comparison == BELOW else value > threshold


def first_crossing(
    points: Iterable[tuple], metric: str, comparison: str, threshold: float
) -> tuple[int, float] | None:
    """(step, value) of the first point of `metric` past the threshold, in the order given
    (the event file's); points are (name, step, value, time) as runs/ingest.py parses them."""
    for name, step, value, *_ in points:
        if name == metric and crosses(value, comparison, threshold):
            return step, value
    return None


def retry_delay(attempts: int, base: float) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: base, 2*base, 4*base ..."""
    return base * 2 ** max(attempts - 1, 0)


def slack_escape(text: str) -> str:
    """Text as Slack reads it literally: `<`, `>` and `&` would otherwise be markup (links,
    @channel mentions), and a run name is typed by a user."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def one_line(text: Any, limit: int) -> str:
    """`text` on one line (an e-mail subject must hold no newline), at most `limit` chars."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def duration(seconds: float | None) -> str:
    """12s, 3m 05s, 2h 01m: how long a run took, for a message."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def run_facts(run, url: str, metrics: dict[str, float | None]) -> dict[str, Any]:
    """The payload's `run` object: what a receiving script needs to act on the run."""
    return {
        "id": run.pk,
        "name": str(run),
        "kind": run.kind,
        "status": run.status,
        "url": url,
        "duration_seconds": run.duration_seconds,
        "step": run.step,
        "total_steps": run.total_steps,
        "best_val_bpb": run.best_val_bpb,
        "error": run.error[:ERROR_CHARS] if run.error else "",
        "tags": sorted(t.name for t in run.tags.all()) if run.pk else [],
        "metrics": metrics,
    }


def end_text(facts: dict[str, Any]) -> str:
    """One line for a run that ended ("Run 'x' (base pretraining #3) succeeded in 2m 10s ...")."""
    name = one_line(facts["name"], NAME_CHARS)
    parts = [
        f"Run '{name}' ({facts['kind']} #{facts['id']}) {facts['status']} "
        f"after {duration(facts['duration_seconds'])}"
    ]
    if facts["best_val_bpb"] is not None:
        parts.append(f"best val bpb {number(facts['best_val_bpb'])}")
    if facts["error"]:
        parts.append(f"error: {one_line(facts['error'], ERROR_CHARS)}")
    parts.append(facts["url"])
    return " · ".join(parts)


def threshold_text(facts: dict[str, Any], rule: dict[str, Any], step: int, value: float) -> str:
    """One line for a rule's first crossing ("val/bpb went below 1.5: 1.43 at step 300 ...")."""
    name = one_line(facts["name"], NAME_CHARS)
    went = "went below" if rule["comparison"] == BELOW else "went above"
    return (
        f"{rule['metric']} {went} {rule['value']:g}: {number(value)} at step {step} in run "
        f"'{name}' ({facts['kind']} #{facts['id']}, {facts['status']}) · {facts['url']}"
    )


def webhook_body(
    event: str, text: str, run: dict | None = None, rule: dict | None = None, **extra: Any
) -> dict[str, Any]:
    """The JSON a webhook receives: Slack's (and Mattermost's, Rocket.Chat's ...) `text`,
    escaped for Slack, plus the same facts as fields for scripts."""
    body: dict[str, Any] = {"text": slack_escape(text), "event": event}
    if run is not None:
        body["run"] = run
    if rule is not None:
        body["rule"] = rule
    body.update(extra)
    return body
