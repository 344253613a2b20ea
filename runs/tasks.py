"""Celery tasks: execute a run (queue `training`); reconcile lost runs (queue `default`: names
outside `runs.tasks.*`, see settings). A new checkpoint's probes are chat/tasks.py's.

`execute_run` is acknowledged late and never re-delivered after a lost worker
(reject_on_worker_lost=False): half a training run must not silently start over on another
machine; the reconciler marks it failed and the user resumes it from its last checkpoint.
"""

from __future__ import annotations

from celery import shared_task
from celery.signals import worker_ready

from runs import execution


@shared_task(
    bind=True, name="runs.tasks.execute_run", acks_late=True, reject_on_worker_lost=False,
    ignore_result=True,
)  # fmt: skip
def execute_run(self, run_id: int, token: str) -> str:
    return execution.execute(run_id, token, worker=self.request.hostname or "")


@shared_task(name="runs.reconcile", ignore_result=True)
def reconcile() -> list[int]:
    return execution.reconcile()


@worker_ready.connect
def _reconcile_on_start(sender=None, **kwargs) -> None:
    """Runs that this worker (same name, same host) was executing before it restarted died."""
    hostname = getattr(sender, "hostname", None)
    if hostname:
        execution.reconcile_worker_restart(hostname)
