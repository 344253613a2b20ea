from django.apps import AppConfig


class AlertsConfig(AppConfig):
    name = "alerts"
    verbose_name = "Alerts"

    def ready(self) -> None:
        # Listen to runs' signals (runs/signals.py) in every process: web and workers alike.
        from alerts import receivers  # noqa: F401
