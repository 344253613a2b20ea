"""`manage.py up`: the whole product on one machine, in one terminal.

Migrates, makes sure an admin exists, starts the embedded Redis when REDIS_URL is unset, then
runs the web server (daphne's, through nanochat_site/webserver.py), the Celery workers, celery
beat and the engine workers as children until Ctrl-C or SIGTERM, and stops them all. Each piece is the same command a multi-machine
deployment runs on its own (see docker/compose.yaml).

The console stays short: one line while starting, one block once everything answers (the URL,
who logs in, where the password and the logs are). The children's own output -- Celery banners,
daphne, Redis -- goes to one file per child under NANOCHAT_HOME/logs/ and shows on the console
only with --verbose; deaths, restarts and crash loops (with the child's last lines) always do.

A child that dies is restarted with backoff (nanochat_site/supervisor.py); the others ride
out its absence -- Celery and the engine worker reconnect to a Redis that went away, and the
embedded Redis comes back from its snapshot. A child that crash-loops is given up on: the web
server or the embedded Redis then stops the whole product (exit status 1), any other child
stays stopped while the rest keeps serving.
"""

from __future__ import annotations

import os
import socket
import sys

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from nanochat_site import embedded_redis
from nanochat_site.bootstrap import ensure_superuser, password_file
from nanochat_site.supervisor import (
    ChildFailed,
    ChildSpec,
    Interrupted,
    RestartPolicy,
    Supervisor,
)


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
    return [sys.executable, "-m", "nanochat_site.webserver", "-b", host, "-p", str(port),
            "nanochat_site.asgi:application"]  # fmt: skip


def log_dir():
    return settings.NANOCHAT_HOME / "logs"


def ready_block(url: str, username: str, password: str | None) -> list[str]:
    """What `up` prints once everything answers: all a new user needs, in a few lines."""
    saved = password_file()
    if password:
        secret = f"{password}  (saved to {saved}, readable only by you)"
    elif saved.exists():
        secret = f"the first one is in {saved} (unless changed since)"
    else:
        secret = "the one this account was given (NANOCHAT_ADMIN_PASSWORD or the admin)"
    return [
        f"nanochat is up: {url}",
        f"  log in as   {username}",
        f"  password    {secret}",
        f"  logs        {log_dir()}/ (one file per process; --verbose shows them here)",
        "  Ctrl-C stops everything",
    ]


class Command(BaseCommand):
    help = "Start the web server, workers and (if REDIS_URL is unset) Redis; Ctrl-C stops all."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument(
            "--grace", type=float, default=10.0,
            help="seconds each child gets to stop after SIGTERM before it is killed",
        )  # fmt: skip
        defaults = RestartPolicy()
        parser.add_argument(
            "--max-restarts", type=int, default=defaults.max_restarts,
            help="a child that dies more often than this within --restart-window seconds is "
                 "not restarted again (0: never restart)",
        )  # fmt: skip
        parser.add_argument("--restart-window", type=float, default=defaults.window)
        parser.add_argument(
            "--verbose", action="store_true",
            help="show every child's output on the console too (it always goes to the log files)",
        )  # fmt: skip
        parser.add_argument(
            "--backoff-max", type=float, default=defaults.backoff_max,
            help="the longest wait before a restart (it starts at 1 s and doubles)",
        )  # fmt: skip

    def handle(self, *args, host: str, port: int, grace: float, **options):
        if port_accepts(host, port):
            raise CommandError(f"port {port} on {host} is already in use; pass --port")
        call_command("migrate", interactive=False, verbosity=0)
        username, password = ensure_superuser()
        supervisor = Supervisor(
            out=self.stdout._out, grace=grace, log_dir=log_dir(), verbose=options["verbose"]
        )
        supervisor.install_signal_handlers()
        policy = RestartPolicy(
            backoff_max=options["backoff_max"],
            max_restarts=options["max_restarts"],
            window=options["restart_window"],
        )
        try:
            self._run(supervisor, policy, host, port, username, password)
        finally:
            supervisor.stop_all()
            supervisor.say("all processes stopped")

    def _run(self, supervisor: Supervisor, policy, host, port, username, password) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NANOCHAT_HOME": str(settings.NANOCHAT_HOME)}
        cwd = str(settings.BASE_DIR)
        supervisor.say(f"starting nanochat (logs in {log_dir()}) ...")
        try:
            if settings.REDIS_EMBEDDED:
                sock = settings.EMBEDDED_REDIS_SOCKET
                embedded_redis.prepare(sock)
                redis_child = supervisor.start(
                    ChildSpec(
                        "redis",
                        embedded_redis.server_argv(sock),
                        env,
                        cwd,
                        stop_last=True,
                        essential=True,
                        before_restart=lambda: embedded_redis.prepare(sock),
                    )
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
            web_spec = ChildSpec("web", web_argv(host, port), env, cwd, essential=True)
            web = supervisor.start(web_spec)
            supervisor.wait_until(web, lambda: port_accepts(host, port), 60, "reachable")
        except (ChildFailed, RuntimeError) as exc:
            self._fail(supervisor, exc)
        except Interrupted:
            return

        display_host = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
        for line in ready_block(f"http://{display_host}:{port}/", username, password):
            supervisor.say(line)

        lost = supervisor.supervise(policy)
        if lost is not None:
            self._fail(supervisor, ChildFailed(lost, "too often; stopping everything"))
        supervisor.say(f"{supervisor.stop_reason}: stopping")

    def _fail(self, supervisor: Supervisor, exc: Exception):
        child = getattr(exc, "child", None)
        supervisor.say(f"error: {exc}")
        if child is not None:
            supervisor.say_tail(child)
        raise CommandError(str(exc))
