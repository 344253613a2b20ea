"""The Celery application: broker, queues and task settings come from Django settings.

Two queues: `training` (long GPU jobs, one at a time per worker, acknowledged late) and
`default` (short housekeeping). `celery -A nanochat_site worker -Q training -c 1` runs on each
GPU node.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nanochat_site.settings")

app = Celery("nanochat_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
