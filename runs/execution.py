"""Running one run on this machine: launch its program, follow its events, honour cancel.

Called by the Celery task on the `training` queue. The program runs in its own process group
(torchrun and every rank it starts), so cancel can signal all of it at once: SIGTERM (the
programs record "cancelled"), then SIGKILL after a grace period. It also dies with the worker
process (PR_SET_PDEATHSIG), so a killed worker leaves no orphan training on the GPU; the
heartbeat it stops writing lets the reconciler mark the run failed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from nanochat_site.proctree import TreeWatcher
from runs import broadcast, signals
from runs.follow import LOG_FILE, Follower, StageFollowers, log_tail
from runs.models import Kind, Run, Status
from runs.programs import program_for

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5
LAUNCHER = Path(settings.BASE_DIR) / "nanochat_site" / "launcher.py"


def claim(run_id: int, token: str, worker: str) -> Run | None:
    """Take a queued run for this launch; None when it is gone, taken, or a stale message."""
    now = timezone.now()
    claimed = Run.objects.filter(pk=run_id, status=Status.QUEUED, launch_token=token).update(
        status=Status.RUNNING, host=socket.gethostname(), worker=worker, started_at=now,
        heartbeat_at=now, finished_at=None, exit_code=None, error="",
    )  # fmt: skip
    if not claimed:
        return None
    run = Run.objects.get(pk=run_id)
    Run.objects.filter(pk=run_id).update(attempts=run.attempts + 1)
    broadcast.send(run)
    return run


# PyTorch's CUDA caching allocator grows segments in place instead of leaving fragments between
# fixed-size blocks: a training step near the card's capacity (the auto device batch aims there)
# then fits where it would otherwise fail on fragmentation. Ignored on CPU.
CUDA_ALLOC_CONF = "expandable_segments:True"


def child_env() -> dict[str, str]:
    """The programs' environment: this process's, plus what every run needs.

    PYTORCH_CUDA_ALLOC_CONF is only a default: a value the admin set (even empty) in it or in
    its newer name PYTORCH_ALLOC_CONF (torch >= 2.9 reads both) is kept.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NANOCHAT_HOME": str(settings.NANOCHAT_HOME)}
    if "PYTORCH_ALLOC_CONF" not in env:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    # The admin's download allow-list, which the programs' fetches enforce (fetch_policy).
    env["NANOCHAT_FETCH_ALLOWED_HOSTS"] = ",".join(settings.FETCH_ALLOWED_HOSTS)
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the programs know nothing of Django
    return env


def execute(run_id: int, token: str, worker: str = "") -> str:
    """Run a queued run to its end; returns its final status (or "skipped")."""
    run = claim(run_id, token, worker)
    if run is None:
        log.info("run %s: not queued for launch %s (cancelled, taken or gone); skipped",
                 run_id, token)  # fmt: skip
        return "skipped"
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    follower = Follower(run)
    status, exit_code, error = Status.SUCCEEDED, 0, ""
    try:
        commands = program_for(run.kind).commands(run)
        for argv in commands:
            exit_code, cancelled = _run_command(run, argv, follower, run_dir / LOG_FILE)
            follower.poll()
            if cancelled:
                status, error = Status.CANCELLED, "cancelled by request"
                break
            if exit_code != 0:
                status = Status.FAILED
                error = _error_line(follower.end, exit_code, argv)
                break
            follower.end = None
    except Exception as exc:  # a bug or a broken setup must still end the run cleanly
        log.exception("run %s: launching failed", run_id)
        status, error = Status.FAILED, f"{type(exc).__name__}: {exc}"
        exit_code = exit_code or None
    _finish(run, status, exit_code, error, log_tail(run_dir / LOG_FILE))
    return status


def _error_line(end: dict | None, exit_code: int, argv: list[str]) -> str:
    if end and end.get("error"):
        return str(end["error"])
    module = argv[argv.index("-m") + 1] if "-m" in argv else argv[0]
    if exit_code < 0:
        return f"{module} was killed by {signal.Signals(-exit_code).name}"
    return f"{module} exited with code {exit_code}"


def _run_command(run: Run, argv: list[str], follower: Follower, log_path: Path):
    """Start one command of the run and follow it to its end; (exit code, cancelled)."""
    with open(log_path, "ab") as log_file:
        log_file.write(f"$ {' '.join(argv)}\n".encode())
        log_file.flush()
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), str(os.getpid()), "--", *argv],
            cwd=settings.BASE_DIR, env=child_env(), stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    Run.objects.filter(pk=run.pk).update(pid=proc.pid)
    run.pid = proc.pid
    tree = TreeWatcher(proc.pid)
    cancelled = False
    deadline = None
    last_beat = 0.0
    while True:
        code = proc.poll()
        follower.poll()
        if code is not None:
            break
        now = time.monotonic()
        if now - last_beat >= settings.RUNS_HEARTBEAT_SECONDS:
            last_beat = now
            tree.refresh()  # ranks run in sessions of their own: remember them while linked
            Run.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())
            wanted = Run.objects.filter(pk=run.pk).values_list("cancel_requested", flat=True)
            if not cancelled and wanted.first():
                cancelled = True
                log.info("run %s: cancel requested; SIGTERM to its processes", run.pk)
                tree.signal(signal.SIGTERM)
                deadline = now + settings.RUNS_CANCEL_GRACE_SECONDS
        if deadline is not None and now > deadline:
            log.info("run %s: still running after the grace period; SIGKILL", run.pk)
            tree.signal(signal.SIGKILL)
            deadline = None
        time.sleep(POLL_SECONDS if not cancelled else 0.1)
    # Whatever the program left behind (a stuck rank) goes with it.
    tree.signal(signal.SIGKILL)
    return code, cancelled


def _finish(run: Run, status: str, exit_code: int | None, error: str, tail: str) -> None:
    with transaction.atomic():
        Run.objects.filter(pk=run.pk).update(
            status=status, exit_code=exit_code, error=error[:5000], log_tail=tail,
            finished_at=timezone.now(), heartbeat_at=timezone.now(),
            eta_seconds=None if status != Status.SUCCEEDED else 0.0,
            progress=1.0 if status == Status.SUCCEEDED else run.progress,
        )  # fmt: skip
        run.refresh_from_db()
        run.mark_artifacts()
    if run.kind == Kind.PIPELINE:
        StageFollowers(run).end_all(status, error)
    log.info("run %s: %s%s", run.pk, status, f" ({error})" if error else "")
    broadcast.send(run)
    signals.send_run_finished(run)


def reconcile(stale_after: float | None = None) -> list[int]:
    """Mark runs whose worker stopped sending heartbeats as failed; returns their ids.

    A worker that was killed (or a machine that went down) cannot record anything itself; its
    runs would otherwise stay "running" forever. If the run's process group is still alive on
    this host (a worker died but PR_SET_PDEATHSIG could not apply) it is killed too.
    """
    stale_after = settings.RUNS_STALE_SECONDS if stale_after is None else stale_after
    cutoff = timezone.now() - timezone.timedelta(seconds=stale_after)
    # A pipeline's stages live and die with the pipeline's own heartbeat.
    running = Run.objects.filter(status=Status.RUNNING, pipeline__isnull=True)
    lost = list(running.filter(heartbeat_at__lt=cutoff))
    lost += list(running.filter(heartbeat_at__isnull=True))
    return [run.pk for run in lost if mark_lost(run, "no heartbeat since")]


def mark_lost(run: Run, why: str) -> bool:
    beat = run.heartbeat_at.isoformat(timespec="seconds") if run.heartbeat_at else "start"
    message = f"worker lost: {why} {beat}" if why.endswith("since") else f"worker lost: {why}"
    updated = Run.objects.filter(pk=run.pk, status=Status.RUNNING).update(
        status=Status.FAILED, error=message, finished_at=timezone.now(),
        log_tail=log_tail(Path(run.run_dir) / LOG_FILE), eta_seconds=None,
    )  # fmt: skip
    if not updated:
        return False
    if run.pid and run.host == socket.gethostname() and _is_training_program(run.pid):
        # Normally gone already (it dies with its worker); never leave it training unwatched.
        TreeWatcher(run.pid).signal(signal.SIGKILL)
    run.refresh_from_db()
    run.mark_artifacts()
    if run.kind == Kind.PIPELINE:
        StageFollowers(run).end_all(Status.FAILED, message)
    broadcast.send(run)
    signals.send_run_finished(run)
    log.warning("run %s: %s", run.pk, message)
    return True


def _is_training_program(pid: int) -> bool:
    """The pid still belongs to a program we launched (pids are reused after a reboot)."""
    try:
        return "training." in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def reconcile_worker_restart(worker: str) -> list[int]:
    """A worker that just started runs nothing yet: its earlier runs died with it."""
    lost = Run.objects.filter(status=Status.RUNNING, worker=worker, host=socket.gethostname(),
                              pipeline__isnull=True)  # fmt: skip
    return [run.pk for run in lost if mark_lost(run, f"{worker} restarted")]
