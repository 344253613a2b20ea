"""Process trees: find, remember and stop every process under a root.

Programs we launch start processes in sessions of their own (torchrun puts each rank in a new
session), so signalling one process group does not reach all of them. What reliably does is
the tree: the root's descendants, remembered while they are still linked to it, because a
child whose parent died is re-parented and can no longer be found from the root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def send(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class TreeWatcher:
    """Remembers every process ever seen under `root_pid` (call `refresh` now and then)."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.seen: dict[int, psutil.Process] = {}
        self.refresh()

    def refresh(self) -> list[psutil.Process]:
        for proc in process_tree(self.root_pid):
            self.seen.setdefault(proc.pid, proc)
        return self.alive()

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.seen.values() if alive(p)]

    def signal(self, sig: int) -> None:
        """Signal every remembered process that is still the same process (psutil checks)."""
        for proc in self.refresh():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.send_signal(sig)


class GaveUpWaiting(RuntimeError):
    """A LoggedProcess died or did not reach the awaited state in time (message has its log)."""


class LoggedProcess:
    """A server-like child (web, worker, Redis) in a session of its own, output to a log file.

    Benchmarks and tests start the product's processes this way: the child's whole process
    group can be stopped at once, and when it fails to come up the error shows its last lines.
    """

    def __init__(self, argv, log_path, env=None, cwd=None, append: bool = False) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab" if append else "wb")  # noqa: SIM115 - see stop()
        self.proc = subprocess.Popen(
            self.argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_for(self, predicate, what: str, timeout: float = 60, interval: float = 0.05):
        """Poll `predicate` until it returns something true; returns that value."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = "exited" if self.proc.poll() is not None else f"{timeout:.0f} s passed"
                raise GaveUpWaiting(f"gave up waiting for {what} ({state})\n{self.log()}")
            time.sleep(interval)
        return value

    def kill(self) -> None:
        """SIGKILL to the whole process group (the child and whatever it forked)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM to the group, SIGKILL after `grace` seconds; closes the log."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode
