"""The alerts' ears on runs/signals.py: a run ended, metric points were stored.

Whatever goes wrong in here is logged and swallowed: an alert is optional, the run is not.
"""

from __future__ import annotations

import logging

from django.dispatch import receiver

from alerts import services
from runs.signals import metrics_stored, run_finished

log = logging.getLogger(__name__)


@receiver(run_finished, dispatch_uid="alerts.run_finished")
def on_run_finished(sender, run, **kwargs) -> None:
    try:
        services.run_finished(run)
    except Exception:  # noqa: BLE001
        log.exception("run %s: its end alert could not be recorded", run.pk)


@receiver(metrics_stored, dispatch_uid="alerts.metrics_stored")
def on_metrics_stored(sender, run, points, **kwargs) -> None:
    try:
        services.metrics_stored(run, points)
    except Exception:  # noqa: BLE001
        log.exception("run %s: its threshold alerts could not be checked", run.pk)
