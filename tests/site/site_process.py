"""Start the product the way a user does (`manage.py up` / `make run`) for black-box tests.

The process runs in its own session, like a job in a terminal, so a test can press "Ctrl-C"
by sending SIGINT to its whole process group. Everything it started is tracked with psutil
so a test can prove that nothing is left behind, and is killed at teardown regardless.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil

REPO = Path(__file__).resolve().parents[2]
UP_BANNER = "nanochat is up: "
UP_BLOCK_END = "Ctrl-C stops everything"  # the last line of `up`'s ready block


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def scratch_database():
    """A fresh PostgreSQL database when DATABASE_URL points at PostgreSQL, else None (SQLite).

    The web app under test migrates its own database, so it must not share pytest-django's.
    """
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        yield None
        return
    import psycopg

    name = f"nanochat_up_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(url)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def site_env(home: Path, database_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE",)}
    env.pop("DATABASE_URL", None)
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(NANOCHAT_HOME=str(home), PYTHONUNBUFFERED="1", **extra)
    return env


class SiteProcess:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path = REPO):
        self.argv = argv
        self.env = env
        self.lines: list[str] = []
        self.url: str | None = None
        self._up = threading.Event()
        self._seen: dict[int, psutil.Process] = {}
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def manage_up(cls, env: dict[str, str], port: int, *args: str) -> SiteProcess:
        argv = [sys.executable, "manage.py", "up", "--port", str(port), "--grace", "5", *args]
        return cls(argv, env)

    def _read(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if UP_BANNER in line:
                self.url = line.split(UP_BANNER, 1)[1].strip()
            elif self.url and UP_BLOCK_END in line:  # up only once the whole block is read
                self._up.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_up(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not self._up.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"site did not come up; output:\n{self.output}")
        self.remember_descendants()
        return self.url

    def remember_descendants(self) -> list[psutil.Process]:
        """Record every process under ours now (to check later that all of them are gone)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for proc in psutil.Process(self.proc.pid).children(recursive=True):
                self._seen[proc.pid] = proc
        return list(self._seen.values())

    def log(self, name: str = "up") -> str:
        """One of the log files `up` writes under NANOCHAT_HOME/logs ("up": its own lines)."""
        path = Path(self.env["NANOCHAT_HOME"]) / "logs" / f"{name}.log"
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def child_pid(self, name: str) -> int:
        """The pid `up` logged for one of its children ("started web (pid 123): ...")."""
        for line in self.log().splitlines():
            marker = f"started {name} (pid "
            if marker in line:
                return int(line.split(marker, 1)[1].split(")", 1)[0])
        raise AssertionError(f"no child named {name!r} in output:\n{self.output}")

    def survivors(self) -> list[psutil.Process]:
        alive = []
        for proc in self._seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive

    def press_ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to every process of the foreground group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait_exit(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill_everything(self) -> None:
        self.remember_descendants()
        for proc in [*self._seen.values()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
