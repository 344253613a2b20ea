"""Where a run's Weights & Biases copy is, for its page and the API.

A program that logs to W&B (training/wandb_sink.py) records it in its `start` event's `wandb`
field: the project and group, the mode, the W&B run id, its web page (online) or local
directory (offline: `wandb sync <dir>` uploads it), or the error that kept it from logging.
No column holds it: the start event is stored whole (RunEvent), and its latest one (a resumed
run starts again) is read here. The event file is the program's word, so it is read as
untrusted: only strings, bounded, and a link only to an http(s) address.
"""

from __future__ import annotations

import shlex
from typing import Any
from urllib.parse import urlsplit

from runs.models import Run, RunEvent

FIELDS = ("project", "group", "mode", "run_id", "url", "dir", "error")
MAX_CHARS = 500


def _web_address(value: str) -> str:
    """`value` when it is an absolute http(s) address, else '' (never a javascript: link)."""
    parts = urlsplit(value)
    return value if parts.scheme in ("http", "https") and parts.netloc else ""


def describe(data: Any) -> dict[str, str] | None:
    """The `wandb` field of a start event's data, cleaned; None when it has none."""
    raw = data.get("wandb") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        return None
    info = {
        key: raw[key][:MAX_CHARS]
        for key in FIELDS
        if isinstance(raw.get(key), str) and raw[key].strip()
    }
    if "url" in info and not _web_address(info["url"]):
        del info["url"]
    if not info.get("project"):
        return None
    if info.get("dir"):
        info["sync_command"] = f"wandb sync {shlex.quote(info['dir'])}"
    return info


def wandb_info(run: Run) -> dict[str, str] | None:
    """What the run's latest start event says about its W&B run (None: no W&B logging)."""
    data = (
        RunEvent.objects.filter(run_id=run.pk, type="start")
        .order_by("-seq")
        .values_list("data", flat=True)
        .first()
    )
    return describe(data)
