"""Run a handful of long-lived child processes as one unit, like a tiny foreman.

Used by `manage.py up`. Each child runs in its own session so a terminal's Ctrl-C reaches
only the supervisor, which then stops the children in a known order (each gets SIGTERM and a
grace period, then everything left in its process tree gets SIGKILL). Output of every child
is shown with its name in front. When a child exits on its own the supervisor says which one
and why, shows its last lines, and stops the rest: a half-running product is worse than a
stopped one.

No Django imports: this is plain process management, testable on its own.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from nanochat_site.proctree import alive, process_tree, send

LAUNCHER = Path(__file__).with_name("launcher.py")


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    # Stopped after every child without this flag (e.g. the broker, which workers need to
    # shut down cleanly).
    stop_last: bool = False


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    reader: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.process.pid


def describe_exit(returncode: int) -> str:
    """Human words for a Popen return code (negative = killed by that signal)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class Supervisor:
    def __init__(self, out=None, grace: float = 10.0):
        self.out = out or sys.stdout
        self.grace = grace
        self.children: list[Child] = []
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self.stop_reason: str | None = None

    # --- output ---------------------------------------------------------------------------
    def say(self, line: str, name: str = "up") -> None:
        width = max([len(c.name) for c in self.children] + [len(name), 2])
        with self._write_lock:
            try:
                self.out.write(f"{name:<{width}} | {line}\n")
                self.out.flush()
            except (BrokenPipeError, ValueError):
                pass  # nobody is reading our output any more; keep supervising

    def _pump(self, child: Child) -> None:
        stream = child.process.stdout
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            child.tail.append(line)
            self.say(line, child.name)
        stream.close()

    # --- lifecycle ------------------------------------------------------------------------
    def start(self, spec: ChildSpec) -> Child:
        argv = [sys.executable, str(LAUNCHER), str(os.getpid()), "--", *spec.argv]
        process = subprocess.Popen(
            argv,
            env=spec.env,
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        child = Child(spec, process)
        self.children.append(child)
        child.reader = threading.Thread(target=self._pump, args=(child,), daemon=True)
        child.reader.start()
        self.say(f"started {spec.name} (pid {process.pid}): {' '.join(spec.argv)}")
        return child

    def wait_until(self, child: Child, probe: Callable[[], bool], timeout: float, what: str):
        """Poll `probe` until true; fail early if the child dies, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise ChildFailed(child, f"before it was {what}")
            if probe():
                return
            if self._stop.wait(0.1):
                raise Interrupted(self.stop_reason or "stop requested")
        raise ChildFailed(child, f"did not become {what} within {timeout:.0f} s", exited=False)

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self.request_stop(f"received {signal.Signals(signum).name}")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def watch(self, poll: float = 0.2) -> Child | None:
        """Block until a stop is requested (returns None) or a child exits (returns it)."""
        while not self._stop.wait(poll):
            for child in self.children:
                if child.process.poll() is not None:
                    return child
        return None

    def stop_all(self) -> None:
        """Stop every child: normal ones together first, then the `stop_last` ones."""
        first = [c for c in self.children if not c.spec.stop_last]
        last = [c for c in self.children if c.spec.stop_last]
        for group in (first, last):
            self._stop_group(group)
        for child in self.children:
            if child.reader is not None:
                child.reader.join(timeout=2)

    def _stop_group(self, children: list[Child]) -> None:
        trees: dict[int, list[psutil.Process]] = {}
        for child in children:
            trees[child.pid] = process_tree(child.pid)
            if child.process.poll() is None:
                self.say(f"stopping {child.name} (pid {child.pid})")
                send(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for child in children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} did not stop within {self.grace:.0f} s; killing it")
        # Whatever is left of each tree -- the leader, pool processes, programs it launched in
        # their own process groups -- is killed outright, and reaped.
        for child in children:
            leftovers = [p for p in trees[child.pid] + process_tree(child.pid) if alive(p)]
            for proc in leftovers:
                send(proc.pid, signal.SIGKILL)
            with_timeout = [p for p in leftovers if p.pid != child.pid]
            psutil.wait_procs(with_timeout, timeout=5)
            if child.process.poll() is None:
                child.process.wait(timeout=5)


class ChildFailed(RuntimeError):
    def __init__(self, child: Child, why: str, exited: bool = True):
        self.child = child
        status = describe_exit(child.process.returncode) if exited else "is still running"
        super().__init__(f"{child.name} (pid {child.pid}) {status} {why}".strip())


class Interrupted(RuntimeError):
    pass
