"""Celery tasks of the alerts (queue `default`: short jobs, never the GPU workers' queue).

`deliver` makes one attempt and, when another may succeed, schedules itself again after the
backoff alerts/delivery.py computed. The database, not Celery's retry counter, holds the
attempts, so a lost message loses nothing: `resend_due` (celery beat, every minute) sends a
message again for any delivery whose next attempt is overdue.
"""

from __future__ import annotations

import logging

from celery import shared_task

from alerts import delivery

log = logging.getLogger(__name__)
TIME_LIMIT = 120  # seconds; one attempt is bounded by ALERT_WEBHOOK_TIMEOUT / EMAIL_TIMEOUT


@shared_task(
    bind=True, name="alerts.deliver", ignore_result=True, max_retries=None,
    soft_time_limit=TIME_LIMIT, time_limit=TIME_LIMIT + 10,
)  # fmt: skip
def deliver(self, delivery_id: int) -> str:
    retry_in = delivery.attempt(delivery_id)
    if retry_in is not None:
        raise self.retry(countdown=retry_in)
    return "done"


@shared_task(name="alerts.resend_due", ignore_result=True)
def resend_due() -> list[int]:
    ids = delivery.overdue_ids()
    for delivery_id in ids:
        enqueue(delivery_id)
    return ids


def enqueue(delivery_id: int, countdown: float = 0) -> None:
    """Send the task message; a broker that is down is logged, and `resend_due` catches up."""
    try:
        deliver.apply_async((delivery_id,), countdown=countdown or None, queue="default")
    except Exception:  # noqa: BLE001 - alerts never fail what triggered them
        log.warning("alert delivery %s: could not be queued; retried later", delivery_id,
                    exc_info=True)  # fmt: skip
