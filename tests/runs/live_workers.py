"""Real Celery workers for tests: separate processes on the test database and the test Redis.

The worker runs the product's settings (not the test settings), pointed by environment
variables at the database pytest-django created and at the same data home and Redis, exactly
as a worker on another machine would be configured.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import psutil
from django.conf import settings
from django.db import connection

from nanochat_site.proctree import LoggedProcess, process_tree

REPO = Path(__file__).resolve().parents[2]


def test_database_url() -> str:
    """A DATABASE_URL for the database this test session uses."""
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE",)}
    env.update(
        DJANGO_SETTINGS_MODULE="nanochat_site.settings",
        DATABASE_URL=test_database_url(),
        NANOCHAT_HOME=str(settings.NANOCHAT_HOME),
        REDIS_URL=settings.REDIS_URL,
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


class LiveWorker(LoggedProcess):
    """`celery worker` (optionally with beat) as a process group of its own."""

    def __init__(self, queues: str, log_dir: Path, beat: bool = False, **env: str):
        self.name = f"test-{queues.replace(',', '-')}-{uuid.uuid4().hex[:6]}@%h"
        argv = [
            sys.executable, "-m", "celery", "-A", "nanochat_site", "worker", "-Q", queues,
            "-c", "1", "-n", self.name, "--without-mingle", "--without-gossip",
            "--loglevel", "INFO",
        ]  # fmt: skip
        if beat:
            argv += ["-B", "--schedule", str(log_dir / f"beat-{uuid.uuid4().hex[:6]}")]
        log_path = log_dir / f"worker-{uuid.uuid4().hex[:6]}.log"
        super().__init__(argv, log_path, env=worker_env(**env), cwd=REPO)
        self.wait_for(lambda: b" ready." in self.log_path.read_bytes(), "celery worker", 60)


def run_processes(pid: int) -> list[psutil.Process]:
    """The run's launcher/torchrun process and everything under it (ranks included)."""
    return process_tree(pid)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25, info=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{info()}")
        time.sleep(interval)


def build_small_inputs(root: Path) -> tuple[Path, Path]:
    """(data dir, tokenizer dir): a small built-in dataset and a 512-token tokenizer, made
    with the real programs (a few seconds), for runs that need real inputs on disk."""
    from training import dataset as dataset_program
    from training import tok_train

    data, tok = root / "data", root / "tok"
    argv = ["builtin", "--out", str(data), "--max-chars", "300000", "--shards", "3"]
    assert dataset_program.main(argv) == 0
    assert tok_train.main(["--data-dir", str(data), "--out", str(tok), "--vocab-size", "512"]) == 0
    return data, tok
