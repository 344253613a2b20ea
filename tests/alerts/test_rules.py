"""alerts/rules.py: when a rule fires, what a message says, how long the next attempt waits.
Pure functions; no database."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from alerts import rules


def points(*pairs, name="val/bpb"):
    return [(name, step, value, 1000.0 + step) for step, value in pairs]


@pytest.mark.parametrize(
    ("value", "comparison", "threshold", "expected"),
    [
        (1.4, "below", 1.5, True),
        (1.5, "below", 1.5, False),  # strictly past the value
        (1.6, "below", 1.5, False),
        (1.6, "above", 1.5, True),
        (1.5, "above", 1.5, False),
        (1.4, "above", 1.5, False),
        (None, "below", 1.5, False),  # NaN/inf were stored as None
        (math.nan, "below", 1.5, False),
        (-math.inf, "below", 1.5, False),
    ],
)
def test_crosses_is_strict_and_ignores_missing_values(value, comparison, threshold, expected):
    assert rules.crosses(value, comparison, threshold) is expected


def test_first_crossing_is_the_first_point_past_the_value_in_file_order():
    batch = points((0, 3.0), (100, 1.8), (200, 1.45), (300, 1.2))
    assert rules.first_crossing(batch, "val/bpb", "below", 1.5) == (200, 1.45)
    assert rules.first_crossing(batch, "val/bpb", "above", 2.5) == (0, 3.0)
    assert rules.first_crossing(batch, "val/bpb", "below", 1.0) is None


def test_first_crossing_reads_only_its_metric():
    batch = points((10, 0.5), name="train/loss") + points((10, 2.0))
    assert rules.first_crossing(batch, "val/bpb", "below", 1.0) is None
    assert rules.first_crossing(batch, "train/loss", "below", 1.0) == (10, 0.5)


def test_retry_delays_double_from_the_base():
    assert [rules.retry_delay(n, 30) for n in range(1, 5)] == [30, 60, 120, 240]
    assert rules.retry_delay(0, 2.5) == 2.5


def test_slack_markup_in_user_text_is_escaped():
    assert rules.slack_escape("<!channel> a & b > c") == "&lt;!channel&gt; a &amp; b &gt; c"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "–"), (-1, "–"), (math.inf, "–"), (0, "0s"), (59.4, "59s"), (185, "3m 05s"),
     (7260, "2h 01m")],
)  # fmt: skip
def test_durations_read_as_people_write_them(seconds, shown):
    assert rules.duration(seconds) == shown


def test_one_line_flattens_and_shortens():
    assert rules.one_line("a\nb\r\n  c", 10) == "a b c"
    assert rules.one_line("x" * 50, 10) == "x" * 9 + "…"


def facts(**over):
    base = {"id": 7, "name": "tiny run", "kind": "base", "status": "succeeded",
            "url": "http://site/runs/7/", "duration_seconds": 130.0, "best_val_bpb": 1.23456,
            "error": "", "metrics": {}}  # fmt: skip
    return {**base, **over}


def test_end_text_names_the_run_its_status_duration_best_bpb_and_link():
    text = rules.end_text(facts())
    assert text == (
        "Run 'tiny run' (base #7) succeeded after 2m 10s · best val bpb 1.235 · http://site/runs/7/"
    )


def test_end_text_of_a_failure_carries_its_error_on_one_line():
    text = rules.end_text(facts(status="failed", best_val_bpb=None, error="boom\nat line 3"))
    assert "failed after 2m 10s" in text and "error: boom at line 3" in text
    assert "best val bpb" not in text and "\n" not in text


def test_threshold_text_says_which_way_the_metric_went():
    rule = {"metric": "val/bpb", "comparison": "below", "value": 1.5}
    text = rules.threshold_text(facts(status="running"), rule, 200, 1.45)
    assert text.startswith("val/bpb went below 1.5: 1.45 at step 200 in run 'tiny run'")
    rule = {"metric": "train/loss", "comparison": "above", "value": 10}
    assert "train/loss went above 10: 12 at step 3" in rules.threshold_text(facts(), rule, 3, 12)


def test_webhook_body_is_slack_text_plus_structured_fields():
    body = rules.webhook_body("run.failed", "run <x> failed", run={"id": 1}, rule=None)
    assert body == {"text": "run &lt;x&gt; failed", "event": "run.failed", "run": {"id": 1}}


def test_run_facts_of_a_run_row_shaped_object():
    run = SimpleNamespace(
        pk=3, kind="sft", status="failed", duration_seconds=5.0, step=10, total_steps=20,
        best_val_bpb=None, error="x" * 1000, tags=SimpleNamespace(all=lambda: []),
    )  # fmt: skip
    out = rules.run_facts(run, "http://s/runs/3/", {"train/loss": 2.0})
    assert out["id"] == 3 and out["url"] == "http://s/runs/3/"
    assert len(out["error"]) == rules.ERROR_CHARS and out["metrics"] == {"train/loss": 2.0}
