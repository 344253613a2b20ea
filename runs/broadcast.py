"""Live updates for the pages: what changed in a run, sent to its channel group.

The run page joins `run-<id>`; lists and the dashboard join `runs`. Sending is best effort: a
Redis hiccup must never fail a training run, so errors are logged and dropped.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)
ALL_RUNS = "runs"
MESSAGE_TYPE = "run.update"  # handled by RunConsumer.run_update


def group_for(run_id: int) -> str:
    return f"run-{run_id}"


def run_summary(run) -> dict[str, Any]:
    return {
        "id": run.pk,
        "kind": run.kind,
        "status": run.status,
        "step": run.step,
        "total_steps": run.total_steps,
        "progress": run.progress,
        "eta_seconds": run.eta_seconds,
        "best_val_bpb": run.best_val_bpb,
        "error": run.error,
        # Unix seconds: pages tick a running run's duration from these (static/js/live.js).
        "started_at": run.started_at.timestamp() if run.started_at else None,
        "finished_at": run.finished_at.timestamp() if run.finished_at else None,
    }


def send(run, metrics: dict | None = None, events: list | None = None, refetch: bool = False):
    message = {
        "type": MESSAGE_TYPE,
        "run": run_summary(run),
        "metrics": metrics or {},
        "events": events or [],
        "refetch": refetch,
    }
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group_for(run.pk), message)
        async_to_sync(layer.group_send)(ALL_RUNS, {**message, "metrics": {}, "events": []})
    except Exception:  # noqa: BLE001 - live updates are optional; training is not
        log.warning("could not broadcast an update of run %s", run.pk, exc_info=True)


def run_changed(run_id: int) -> None:
    """Broadcast a run's current state (after a status change made outside its task)."""
    from runs.models import Run

    run = Run.objects.filter(pk=run_id).first()
    if run is not None:
        send(run)
