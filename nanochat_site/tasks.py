"""Site-wide Celery tasks."""

import os
import socket
import time

from celery import shared_task


@shared_task(name="nanochat_site.ping")
def ping(payload: str = "") -> dict:
    """Answer from inside a worker: proves the broker, a worker and the result backend work."""
    return {
        "payload": payload,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
    }
