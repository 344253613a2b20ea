"""What other apps may hear about runs: a run ended, a batch of metric points was stored.

The alerts app (a floor above runs) listens; runs never imports it, so the floors stay one-way
(tests/test_import_floors.py). Both signals are sent once the change is committed — a listener
that reads the run sees what was stored — and through `send_robust`: an exception in a
listener is logged here and dropped, so nothing a listener does can fail ingest, a run's task
or the request that cancelled it.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.dispatch import Signal

log = logging.getLogger(__name__)

# kwargs: run (a Run whose status is one of FINISHED_STATUSES, with its final fields).
run_finished = Signal()
# kwargs: run, points (a list of (name, step, value or None, unix time), in file order).
metrics_stored = Signal()


def _send(signal: Signal, run, **kwargs) -> None:
    try:
        answers = signal.send_robust(sender=type(run), run=run, **kwargs)
    except Exception:  # noqa: BLE001 - a listener must never fail a run
        log.exception("run %s: a signal could not be sent", run.pk)
        return
    for receiver, answer in answers:
        if isinstance(answer, Exception):
            log.error("run %s: %r failed: %r", run.pk, receiver, answer)


def send_run_finished(run) -> None:
    """Tell the listeners that `run` reached its end, once the current transaction commits."""
    transaction.on_commit(lambda: _send(run_finished, run))


def send_metrics_stored(run, points: list[tuple]) -> None:
    """Tell the listeners which metric points of `run` were just stored (nothing if none)."""
    if points:
        transaction.on_commit(lambda: _send(metrics_stored, run, points=points))
