"""`manage.py up`: the whole product on one machine, in one terminal.

Migrates, makes sure an admin exists, starts the embedded Redis when REDIS_URL is unset, then
runs the web server (daphne), the Celery workers, celery beat and the engine workers as children until
Ctrl-C or SIGTERM, and stops them all. Each piece is the same command a multi-machine
deployment runs on its own (see docker/compose.yaml).
"""

from __future__ import annotations

import os
import socket
import sys

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from nanochat_site import embedded_redis
from nanochat_site.bootstrap import ensure_superuser
from nanochat_site.supervisor import ChildFailed, ChildSpec, Interrupted, Supervisor


def port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def celery_worker_argv(queue: str, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "nanochat_site", "worker",
        "-Q", queue, "-c", str(concurrency), "-n", f"{queue}@%h",
        "-O", "fair", "--loglevel", "INFO", "--without-mingle", "--without-gossip",
    ]  # fmt: skip


def beat_argv() -> list[str]:
    """The scheduler of periodic housekeeping (the lost-run reconciler)."""
    return [
        sys.executable, "-m", "celery", "-A", "nanochat_site", "beat", "--loglevel", "INFO",
        "--schedule", str(settings.CELERY_BEAT_SCHEDULE_FILENAME),
    ]  # fmt: skip


def engine_argv() -> list[str]:
    """The chat engine worker: takes generation requests from the channel layer."""
    return [sys.executable, "manage.py", "engine_worker"]


def web_argv(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "daphne", "-b", host, "-p", str(port),
            "nanochat_site.asgi:application"]  # fmt: skip


class Command(BaseCommand):
    help = "Start the web server, workers and (if REDIS_URL is unset) Redis; Ctrl-C stops all."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument(
            "--grace", type=float, default=10.0,
            help="seconds each child gets to stop after SIGTERM before it is killed",
        )  # fmt: skip

    def handle(self, *args, host: str, port: int, grace: float, **options):
        if port_accepts(host, port):
            raise CommandError(f"port {port} on {host} is already in use; pass --port")
        call_command("migrate", interactive=False, verbosity=0)
        username, password = ensure_superuser()
        supervisor = Supervisor(out=self.stdout._out, grace=grace)
        supervisor.install_signal_handlers()
        try:
            self._run(supervisor, host, port, username, password)
        finally:
            supervisor.stop_all()
            supervisor.say("all processes stopped")

    def _run(self, supervisor: Supervisor, host, port, username, password) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NANOCHAT_HOME": str(settings.NANOCHAT_HOME)}
        cwd = str(settings.BASE_DIR)
        try:
            if settings.REDIS_EMBEDDED:
                sock = settings.EMBEDDED_REDIS_SOCKET
                embedded_redis.prepare(sock)
                redis_child = supervisor.start(
                    ChildSpec("redis", embedded_redis.server_argv(sock), env, cwd, stop_last=True)
                )
                supervisor.wait_until(
                    redis_child, lambda: embedded_redis.answers(sock), 15, "ready"
                )
                env["REDIS_URL"] = settings.REDIS_URL
            for spec in [
                ChildSpec("worker-training", celery_worker_argv("training", 1), env, cwd),
                ChildSpec("worker-default", celery_worker_argv("default", 2), env, cwd),
                ChildSpec("beat", beat_argv(), env, cwd),
                ChildSpec("engine", engine_argv(), env, cwd),
            ]:
                supervisor.start(spec)
            web = supervisor.start(ChildSpec("web", web_argv(host, port), env, cwd))
            supervisor.wait_until(web, lambda: port_accepts(host, port), 60, "reachable")
        except (ChildFailed, RuntimeError) as exc:
            self._fail(supervisor, exc)
        except Interrupted:
            return

        display_host = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
        supervisor.say(f"nanochat is up: http://{display_host}:{port}/")
        if password:
            supervisor.say(f"admin login: {username} / {password}  (shown once; change it)")
        else:
            supervisor.say(f"log in as {username} (or another account); Ctrl-C stops everything")

        died = supervisor.watch()
        if died is not None:
            self._fail(supervisor, ChildFailed(died, "unexpectedly"))
        supervisor.say(f"{supervisor.stop_reason}: stopping")

    def _fail(self, supervisor: Supervisor, exc: Exception):
        child = getattr(exc, "child", None)
        supervisor.say(f"error: {exc}")
        if child is not None and child.tail:
            supervisor.say(f"last lines from {child.name}:")
            for line in list(child.tail)[-15:]:
                supervisor.say(f"    {line}")
        raise CommandError(str(exc))
