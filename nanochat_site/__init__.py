"""The Django project: settings, URLs, ASGI routing, the Celery app and site-wide services."""

from nanochat_site.celery import app as celery_app

__all__ = ["celery_app"]
