"""Process trees: find, remember and stop every process under a root.

Programs we launch start processes in sessions of their own (torchrun puts each rank in a new
session), so signalling one process group does not reach all of them. What reliably does is
the tree: the root's descendants, remembered while they are still linked to it, because a
child whose parent died is re-parented and can no longer be found from the root.
"""

from __future__ import annotations

import contextlib
import os

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
