"""Run a handful of long-lived child processes as one unit, like a tiny foreman.

Used by `manage.py up`. Each child runs in its own session so a terminal's Ctrl-C reaches
only the supervisor, which then stops the children in a known order (each gets SIGTERM and a
grace period, then everything left in its process tree gets SIGKILL).

Output: with a `log_dir`, every child's output goes to `<log_dir>/<name>.log` and the
supervisor's own lines to `up.log`, so nothing is lost when the console is kept short. The
console gets what a person must see -- the lines passed to `say` (deaths, restarts, crash loops
with the child's last lines, the stop) -- and, when `verbose`, also the children's output and
the routine `note`s (which child started with which pid), each line with its source in front.

A child that exits on its own is restarted: one killed worker must not take the site down.
What is left of its session (a Celery pool process, say) is killed first, so a restarted
worker never races a half-dead one. Restarts back off exponentially (RestartPolicy), and a
child that keeps dying -- more than `max_restarts` deaths within `window` seconds -- is a crash
loop: the supervisor says so (which child, how often, its last lines) and stops restarting it.
Losing an *essential* child that way (the web server, the embedded Redis) stops the whole
product, since nothing works without it; any other child is left stopped and the rest keeps
serving (the health page shows what is missing).

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
from datetime import datetime
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
    # A crash loop of an essential child stops the whole product (see the module docstring).
    essential: bool = False
    # Called before every restart (e.g. to clear a socket file the dead child left behind).
    before_restart: Callable[[], None] | None = None


@dataclass(frozen=True)
class RestartPolicy:
    """When a child that died is started again, and when the supervisor gives up on it."""

    backoff_initial: float = 1.0  # seconds before the first restart
    backoff_max: float = 30.0  # the delay doubles per restart up to this
    stable_after: float = 60.0  # a child up this long starts again from backoff_initial
    max_restarts: int = 5  # more deaths than this within `window` seconds: a crash loop
    window: float = 60.0

    def delay(self, consecutive: int) -> float:
        """Seconds to wait before restart number `consecutive` (1, 2, ...) in a row."""
        return min(self.backoff_max, self.backoff_initial * 2 ** max(0, consecutive - 1))


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))
    reader: threading.Thread | None = None
    started_at: float = field(default_factory=time.monotonic)
    deaths: collections.deque = field(default_factory=collections.deque)  # monotonic times
    restarts: int = 0  # restarts in a row, without a stable run in between
    restart_at: float | None = None  # a restart is scheduled for this monotonic time
    given_up: bool = False

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
    def __init__(
        self, out=None, grace: float = 10.0, log_dir: Path | None = None, verbose: bool = True
    ):
        self.out = out or sys.stdout
        self.grace = grace
        self.log_dir = log_dir
        self.verbose = verbose
        self.children: list[Child] = []
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self.stop_reason: str | None = None
        self._log = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._log = self._open_log("up")

    # --- output ---------------------------------------------------------------------------
    def say(self, line: str, name: str = "up") -> None:
        """A line for the console (and up.log): something a person must see."""
        self._emit(line, name, console=True)

    def note(self, line: str, name: str = "up") -> None:
        """A routine line: always in up.log, on the console only when verbose."""
        self._emit(line, name, console=self.verbose)

    def _emit(self, line: str, name: str, console: bool) -> None:
        width = max([len(c.name) for c in self.children] + [len(name), 2])
        named = f"{name:<{width}} | {line}"
        with self._write_lock:
            if self._log is not None:
                self._log.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {named}\n")
            if not console:
                return
            try:
                # Only the verbose console mixes several sources; a quiet one is all ours.
                self.out.write(f"{named if self.verbose else line}\n")
                self.out.flush()
            except (BrokenPipeError, ValueError):
                pass  # nobody is reading our output any more; keep supervising

    def _open_log(self, name: str):
        """An append-mode, line-buffered log file in log_dir (kept across restarts of `up`)."""
        return open(self.log_dir / f"{name}.log", "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def _pump(self, child: Child, log) -> None:
        stream = child.process.stdout
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            child.tail.append(line)
            if log is not None:
                log.write(line + "\n")
            if self.verbose:
                self._emit(line, child.name, console=True)
        stream.close()
        if log is not None:
            log.close()

    # --- lifecycle ------------------------------------------------------------------------
    def start(self, spec: ChildSpec) -> Child:
        child = Child(spec, self._spawn(spec))
        self.children.append(child)
        self._read(child)
        self.note(f"started {spec.name} (pid {child.pid}): {' '.join(spec.argv)}")
        return child

    def _spawn(self, spec: ChildSpec) -> subprocess.Popen:
        # Children are only ever spawned from the main thread: the launcher's PR_SET_PDEATHSIG
        # fires when the *thread* that forked it ends.
        argv = [sys.executable, str(LAUNCHER), str(os.getpid()), "--", *spec.argv]
        return subprocess.Popen(
            argv,
            env=spec.env,
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _read(self, child: Child) -> None:
        log = None
        if self.log_dir is not None:
            log = self._open_log(child.name)
            log.write(f"--- {datetime.now():%Y-%m-%d %H:%M:%S} pid {child.pid}: "
                      f"{' '.join(child.spec.argv)}\n")  # fmt: skip
        child.reader = threading.Thread(target=self._pump, args=(child, log), daemon=True)
        child.reader.start()

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

    def supervise(self, policy: RestartPolicy, poll: float = 0.2) -> Child | None:
        """Restart children that die until a stop is requested (returns None) or an essential
        child crash-loops (returns it; the caller stops everything)."""
        while not self._stop.wait(poll):
            now = time.monotonic()
            for child in self.children:
                if child.given_up:
                    continue
                if child.restart_at is not None:
                    if now < child.restart_at or self._restart(child):
                        continue
                    # It could not even be started: that counts as another death.
                elif child.process.poll() is None:
                    continue
                if not self._died(child, policy, now) and child.spec.essential:
                    return child
        return None

    def _died(self, child: Child, policy: RestartPolicy, now: float) -> bool:
        """Note a death; schedule a restart (True) or give up on a crash loop (False)."""
        self._kill_session(child)
        if child.reader is not None:
            child.reader.join(timeout=2)  # its last lines, before they are quoted
        if now - child.started_at >= policy.stable_after:
            child.restarts = 0
        child.deaths.append(now)
        while child.deaths and now - child.deaths[0] > policy.window:
            child.deaths.popleft()
        how = f"{child.name} (pid {child.pid}) {describe_exit(child.process.returncode)}"
        if len(child.deaths) > policy.max_restarts:
            child.given_up = True
            rest = "stopping everything" if child.spec.essential else "the rest keeps running"
            self.say(
                f"{how}: {_deaths(len(child.deaths))} within {policy.window:g} s, "
                f"a crash loop; not restarting it again ({rest})"
            )
            self.say_tail(child)
            return False
        child.restarts += 1
        delay = policy.delay(child.restarts)
        child.restart_at = now + delay
        self.say(f"{how}; restarting in {delay:g} s (restart {child.restarts})")
        return True

    def _restart(self, child: Child) -> bool:
        child.restart_at = None
        try:
            if child.spec.before_restart is not None:
                child.spec.before_restart()
            process = self._spawn(child.spec)
        except (OSError, RuntimeError) as exc:
            self.say(f"cannot restart {child.name}: {exc}")
            return False
        child.process, child.started_at = process, time.monotonic()
        self._read(child)
        self.say(f"restarted {child.name} (pid {child.pid})")
        return True

    def say_tail(self, child: Child, lines: int = 15) -> None:
        if child.tail:
            self.say(f"last lines from {child.name}:")
            for line in list(child.tail)[-lines:]:
                self.say(f"    {line}")

    def _kill_session(self, child: Child) -> None:
        """SIGKILL what the dead child left in its session (e.g. Celery pool processes)."""
        for proc in psutil.process_iter():
            try:
                if proc.pid != child.pid and os.getsid(proc.pid) == child.pid:
                    proc.kill()
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue

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
                self.note(f"stopping {child.name} (pid {child.pid})")
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


def _deaths(count: int) -> str:
    return f"{count} death" if count == 1 else f"{count} deaths"


class ChildFailed(RuntimeError):
    def __init__(self, child: Child, why: str, exited: bool = True):
        self.child = child
        status = describe_exit(child.process.returncode) if exited else "is still running"
        super().__init__(f"{child.name} (pid {child.pid}) {status} {why}".strip())


class Interrupted(RuntimeError):
    pass
