"""Health of the moving parts: database, Redis, the channel layer, Celery and engine workers.

Plain functions so that the health endpoint, the home page and `manage.py up` report the
same facts in the same words.
"""

import time
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection


def _timed(check) -> dict:
    start = time.perf_counter()
    try:
        detail = check()
    except Exception as exc:  # a health check reports failures, it never raises them
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result = {"ok": True, "ms": round((time.perf_counter() - start) * 1000, 1)}
    if detail:
        result.update(detail)
    return result


def check_database() -> dict:
    def run():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return {"vendor": connection.vendor}

    return _timed(run)


def check_channel_layer() -> dict:
    """Send a message to a fresh channel and read it back through the layer (i.e. Redis)."""

    def run():
        layer = get_channel_layer()
        channel = async_to_sync(layer.new_channel)()
        token = uuid.uuid4().hex
        async_to_sync(layer.send)(channel, {"type": "health.ping", "token": token})
        message = async_to_sync(layer.receive)(channel)
        if message.get("token") != token:
            raise RuntimeError("channel layer returned a different message")
        return {"backend": type(layer).__name__}

    return _timed(run)


def celery_workers(timeout: float = 1.0) -> dict:
    """Ask every Celery worker to answer within `timeout` seconds; list the ones that did."""
    from nanochat_site.celery import app

    def run():
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
        workers = [
            {"name": name, "queues": sorted(q["name"] for q in queues)}
            for name, queues in sorted(replies.items())
        ]
        return {"workers": workers}

    return _timed(run)


def engine_workers() -> dict:
    """The chat engine workers alive now (each refreshes its stats key in Redis every second)."""
    from chat.stats import read_stats, summary

    def run():
        workers = read_stats()
        listed = [
            {
                "name": f"{w['host']}:{w['pid']} ({w['device']})",
                "detail": f"{len(w['models'])} model(s) loaded, {w['active_rows']}/"
                f"{w['capacity']} rows busy, {w['queued']} waiting",
            }
            for w in workers
        ]
        return {**summary(workers), "workers": listed}

    return _timed(run)


def report(worker_timeout: float = 1.0) -> dict:
    checks = {
        "database": check_database(),
        "channel_layer": check_channel_layer(),
        "celery": celery_workers(worker_timeout),
        "engine": engine_workers(),
    }
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}
