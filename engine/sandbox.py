"""Run untrusted Python (HumanEval completions) in a throwaway, isolated child process.

Why: a graded completion is code written by a model, and an independent probe showed that an
in-process jail of stubbed functions is undone in one line (re-import `posix`, `ctypes`, find
`Popen` through `gc`). So the jail is now the kernel's, not Python's.

Isolated mode (the default, SPEC §10). Each call starts bubblewrap (`bwrap`) with new pid, net,
ipc, uts and mount namespaces (a user namespace too when the parent is not root):
- no network: the new net namespace has only a loopback that is down, so neither Redis,
  PostgreSQL nor the site on 127.0.0.1 can be reached; abstract unix sockets are per namespace;
- the file system is read-only binds of only what Python needs (/usr, /lib*, /etc/ld.so.*, the
  interpreter's prefixes) plus a private `/tmp` tmpfs of at most `TMPFS_BYTES` holding the
  working directory; nothing of the host's /tmp, /root, the repository or the data home
  (NANOCHAT_HOME) is there, and nothing the program writes reaches the host's disk;
- `/proc` shows only the sandbox's own processes; the parent, its environment and other users'
  processes cannot be seen or signalled; the environment is empty apart from LANG, HOME, PATH;
- it runs as an unprivileged uid with no capabilities and no_new_privs. When the parent is root,
  bwrap keeps only CAP_SETUID/CAP_SETGID and the runner's first act is to become a fresh uid
  from `_SANDBOX_UIDS` (a new uid per run, so RLIMIT_NPROC counts only this run's processes);
  otherwise the uid is the caller's own, mapped in a user namespace where RLIMIT_NPROC again
  counts only the namespace's processes;
- when the run ends (or at `timeout + KILL_GRACE_S`) the parent kills the namespace's init,
  so the kernel kills every process in it, setsid()/double-forked ones included, and
  `run_python` returns only after the namespace is empty.

Inside, a small runner caps address space (RLIMIT_AS), CPU, file size, open files and processes
(RLIMIT_NPROC = `MAX_PROCESSES`, threads included), arms a wall-clock alarm at `timeout`, stubs
destructive os/subprocess functions (a guard against accidents, not a security boundary), and
reads the program from its working directory. stdin is /dev/null unless text is given.

The verdict is the parent's own observation: the parent draws a random nonce per run and hands it
to the runner over a pipe that the runner reads and closes before the program runs; the runner
writes the nonce to its report pipe only after the whole program (answer, tests, `check(...)`)
ran to the end without an exception -- `sys.exit(0)` included. Success = the child exited with
status 0 before the deadline and the report carries the nonce. Writing `{"success": true}` to the
report pipe, `os._exit(0)`, atexit handlers or `sys.excepthook` tricks therefore fail.

What an attacker inside the interpreter can still do: the program and its tests share one
interpreter with the runner, so code that goes looking for the nonce (frames, `gc`) or rewrites
the test's `check`/`assert` machinery can still make a wrong answer pass. It can burn its CPU and
memory allowance (at most `MAX_PROCESSES` processes of `memory_limit_mb` each) until the kill,
and where the host allows unprivileged user namespaces it can create its own (kernel attack
surface, not a way out of the mounts or the network). Grading integrity against a model that
targets the grader would need the tests to run in a separate process.

Weak mode. Where bubblewrap is missing or fails its probe (e.g. in a container without user
namespaces), `run_python` raises `SandboxUnavailable` unless the environment variable
`NANOCHAT_SANDBOX=weak` allows the old, unisolated mode: the same runner in a plain child process
with a host temp directory, no namespaces and no RLIMIT_NPROC (it would count the caller's other
processes). That guards against accidents only; every `ExecutionResult` says which mode ran.
`NANOCHAT_BWRAP` names the bwrap binary (default: `bwrap` on PATH). The probe runs once per
process (per bwrap path) and its result is cached.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

ISOLATED = "isolated"
WEAK = "weak"
SANDBOX_MODE_ENV = "NANOCHAT_SANDBOX"
BWRAP_ENV = "NANOCHAT_BWRAP"

MAX_OUTPUT_BYTES = 1024 * 1024
# Time the parent allows past `timeout` for the child's own alarm to end it, before SIGKILL.
KILL_GRACE_S = 1.0
# Below this the interpreter cannot even finish the runner's start-up.
MIN_MEMORY_LIMIT_MB = 32
# Processes and threads one isolated run may have (the runner itself is one).
MAX_PROCESSES = 8
# Size of the isolated run's private /tmp, its working directory included.
TMPFS_BYTES = 64 * 1024 * 1024
PROGRAM_FILE = "program.py"
# Where the working directory is inside the isolated sandbox.
SANDBOX_WORKDIR = "/tmp/work"
_MAX_FILE_BYTES = 64 * 1024 * 1024
_MAX_REPORT_BYTES = 64 * 1024
_READ_CHUNK = 65536
_PROBE_TIMEOUT_S = 10.0
# Seconds to wait for bwrap to exit after its namespace's init was killed.
_REAP_WAIT_S = 5.0
# Fresh uids for isolated runs under a root parent: high, unnamed, not used by real accounts.
_SANDBOX_UIDS = range(0x7000_0000, 0x7FFF_0000)
_RO_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_RO_OPTIONAL_PATHS = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")

# argv: report fd, nonce fd, timeout (s), address-space limit (bytes), file-size limit (bytes),
# process limit (0: none), uid to become (-1: stay).
_RUNNER_SOURCE = r"""
import builtins, json, math, os, posix, resource, shutil, signal, subprocess, sys, traceback
import types

report_fd, nonce_fd = int(sys.argv[1]), int(sys.argv[2])
timeout = float(sys.argv[3])
memory_bytes, file_bytes, max_processes, run_as = (int(arg) for arg in sys.argv[4:8])
with open(nonce_fd, "rb", closefd=True) as nonce_pipe:
    nonce = nonce_pipe.read().decode()
if run_as >= 0:
    os.setgroups([])
    os.setresgid(run_as, run_as, run_as)
    os.setresuid(run_as, run_as, run_as)  # also drops the last capabilities
with open("program.py", encoding="utf-8") as program_file:
    source = program_file.read()


class SandboxTimeout(BaseException):
    # A BaseException, so the program's `except Exception` cannot swallow it.
    pass


def disabled(name):
    def blocked(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    return blocked


def make_reporter(token):
    # The nonce lives only in this closure from here on (see engine/sandbox.py on its limits).
    def report(outcome):
        message = dict(outcome, nonce=token if outcome.pop("passed") else "")
        data = json.dumps(message).encode()
        while data:
            data = data[os.write(report_fd, data):]

    return report


report = make_reporter(nonce)
del nonce
outcome = {"passed": False, "error": None, "timeout": False, "memory_exceeded": False}


def on_alarm(signum, frame):
    outcome["timeout"] = True
    raise SandboxTimeout


resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails instead of killing
cpu_seconds = math.ceil(timeout) + 1
resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
if max_processes:
    resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

# putenv/unsetenv stay: they only touch this child's environment, and numpy calls putenv.
destructive = {
    os: "kill killpg system popen remove unlink rmdir removedirs rename renames"
    " replace truncate chmod fchmod lchmod chown fchown lchown chflags lchflags chroot chdir"
    " fchdir fork forkpty execl execle execlp execlpe execv execve execvp execvpe spawnl spawnle"
    " spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp setsid setpgid"
    " setpgrp setuid setgid seteuid setegid setreuid setregid setresuid setresgid setgroups"
    " plock",
    shutil: "rmtree move chown",
    subprocess: "Popen run call check_call check_output getoutput getstatusoutput",
    resource: "setrlimit prlimit",
    builtins: "exit quit help",
}
destructive[posix] = destructive[os]
for module, names in destructive.items():
    for name in names.split():
        if hasattr(module, name):
            setattr(module, name, disabled(f"{module.__name__}.{name}"))
for name in ("ctypes", "_ctypes", "_posixsubprocess"):
    sys.modules[name] = None

# The program gets a fresh __main__, not the runner's globals.
program_module = types.ModuleType("__main__")
sys.modules["__main__"] = program_module
signal.signal(signal.SIGALRM, on_alarm)
try:
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        exec(compile(source, "program.py", "exec"), program_module.__dict__)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    outcome["passed"] = not outcome["timeout"]
except SandboxTimeout:
    pass
except BaseException as exc:
    # SystemExit too: leaving early, even with status 0, is not running the tests to the end.
    outcome["memory_exceeded"] = isinstance(exc, MemoryError)
    try:
        if isinstance(exc, SystemExit):
            outcome["error"] = f"SystemExit: {exc.code}"
        else:
            outcome["error"] = "".join(traceback.format_exception_only(exc)).strip()[:10000]
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    except MemoryError:
        outcome["error"] = type(exc).__name__

if outcome["timeout"]:
    # Also when the program caught the timeout and went on to finish.
    outcome["passed"] = False
    outcome["error"] = outcome["error"] or f"timed out after {timeout:g} s"
for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
    try:
        stream.flush()
    except Exception:
        pass
report(outcome)
# Skip interpreter shutdown: a thread the program left running must not keep the child alive.
os._exit(0)
"""


class SandboxUnavailable(RuntimeError):
    """Isolation is not usable here and weak mode was not allowed."""


@dataclass(frozen=True)
class ExecutionResult:
    """What running a program in the sandbox produced.

    success: the program ran to the end without an exception, as observed by the parent.
    error: the exception as "Type: message" (or why the run ended) when not successful.
    timeout: the wall-clock limit was reached. memory_exceeded: a MemoryError was raised.
    mode: "isolated" (namespaces) or "weak" (a plain child process; see the module docstring).
    """

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    mode: str = ISOLATED


def sandbox_mode() -> str:
    """The mode `run_python` uses here: "isolated" where bubblewrap works, else "weak" when
    NANOCHAT_SANDBOX=weak allows it; otherwise raises SandboxUnavailable (one line, naming the
    setting). Probes bubblewrap once per process."""
    setting = os.environ.get(SANDBOX_MODE_ENV, "").strip().lower()
    if setting not in ("", ISOLATED, WEAK):
        raise ValueError(f"{SANDBOX_MODE_ENV} must be '{ISOLATED}' or '{WEAK}', got {setting!r}")
    problem = _isolation_problem(_bwrap_path())
    if problem is None:
        return ISOLATED
    if setting == WEAK:
        return WEAK
    raise SandboxUnavailable(
        f"sandbox: namespace isolation is not usable here ({problem}); install bubblewrap "
        f"(Debian package 'bubblewrap') or set {SANDBOX_MODE_ENV}=weak to allow the unisolated mode"
    )


def run_python(
    code: str, timeout: float = 5.0, memory_limit_mb: int = 256, stdin: str | None = None
) -> ExecutionResult:
    """Run `code` as a program in the sandbox and report what happened.

    Returns within about `timeout + 1` seconds and leaves no process or directory behind.
    `stdin`, when given, is what the program reads from standard input; otherwise it reads EOF.
    Raises SandboxUnavailable where isolation does not work and weak mode is not allowed.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout}")
    if isinstance(memory_limit_mb, bool) or not isinstance(memory_limit_mb, int):
        raise TypeError(f"memory_limit_mb must be an int, got {type(memory_limit_mb).__name__}")
    if memory_limit_mb < MIN_MEMORY_LIMIT_MB:
        raise ValueError(
            f"memory_limit_mb must be at least {MIN_MEMORY_LIMIT_MB}, got {memory_limit_mb}"
        )
    if stdin is not None and not isinstance(stdin, str):
        raise TypeError(f"stdin must be a str or None, got {type(stdin).__name__}")

    limits = _Limits(float(timeout), memory_limit_mb * 1024 * 1024)
    if sandbox_mode() == ISOLATED:
        return _run_isolated(_bwrap_path(), code, limits, stdin)
    return _run_weak(code, limits, stdin)


@dataclass(frozen=True)
class _Limits:
    timeout: float
    memory_bytes: int


# ---- choosing the mode ----------------------------------------------------------------------

_probe_lock = threading.Lock()
_probe_results: dict[str, str | None] = {}


def _bwrap_path() -> str:
    return os.environ.get(BWRAP_ENV) or shutil.which("bwrap") or "bwrap"


def _isolation_problem(bwrap: str) -> str | None:
    """None when an isolated run of an empty program succeeds with this bwrap, else why not."""
    with _probe_lock:
        if bwrap not in _probe_results:
            _probe_results[bwrap] = _probe(bwrap)
        return _probe_results[bwrap]


def _probe(bwrap: str) -> str | None:
    if not (os.path.isfile(bwrap) and os.access(bwrap, os.X_OK)):
        return f"no bubblewrap executable at {bwrap!r}"
    try:
        result = _run_isolated(bwrap, "", _Limits(_PROBE_TIMEOUT_S, 256 * 1024 * 1024), None)
    except OSError as exc:
        return f"{bwrap} could not start: {exc}"
    if result.success:
        return None
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return f"{bwrap} probe failed: {lines[-1] if lines else result.error}"


# ---- the two ways to start the runner ---------------------------------------------------------


def _runner_argv(report_fd: int, nonce_fd: int, limits: _Limits, nproc: int, uid: int) -> list:
    return [
        sys.executable,
        "-I",
        "-X",
        "utf8",
        "-c",
        _RUNNER_SOURCE,
        str(report_fd),
        str(nonce_fd),
        repr(limits.timeout),
        str(limits.memory_bytes),
        str(_MAX_FILE_BYTES),
        str(nproc),
        str(uid),
    ]


def _environment(home: str, tmpdir: str) -> dict[str, str]:
    # Nothing from ours (secrets, database URLs) reaches the program. One malloc arena: each
    # extra arena reserves 64 MiB of address space, a quarter of the default limit.
    return {
        "HOME": home,
        "TMPDIR": tmpdir,
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MALLOC_ARENA_MAX": "1",
        "OMP_NUM_THREADS": "1",
    }


def _run_isolated(bwrap: str, code: str, limits: _Limits, stdin: str | None) -> ExecutionResult:
    program_fd = os.memfd_create("program.py")
    info_read, info_write = os.pipe()
    try:
        try:
            os.write(program_fd, code.encode("utf-8"))
            os.lseek(program_fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(program_fd)
            os.close(info_write)
            raise
        as_root = os.geteuid() == 0
        uid = secrets.choice(_SANDBOX_UIDS) if as_root else -1

        def command(report_fd: int, nonce_fd: int) -> list[str]:
            runner = _runner_argv(report_fd, nonce_fd, limits, MAX_PROCESSES, uid)
            return [*_bwrap_options(bwrap, as_root, program_fd, info_write), *runner]

        return _run(
            command,
            limits,
            stdin,
            cwd=None,
            env=None,
            extra_fds=(program_fd, info_write),
            info_fd=info_read,
            mode=ISOLATED,
        )
    finally:
        os.close(info_read)


def _bwrap_options(bwrap: str, as_root: bool, program_fd: int, info_fd: int) -> list[str]:
    if as_root:
        # No user namespace: the runner must become a real unprivileged uid, which a namespace
        # mapping only root could not hold. bwrap keeps just the capabilities for that.
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
        namespaces += ["--unshare-cgroup-try", "--cap-drop", "ALL"]
        namespaces += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        namespaces = ["--unshare-all", "--unshare-user", "--disable-userns"]
    options = [bwrap, *namespaces, "--die-with-parent", "--new-session"]
    bound: list[str] = []
    for path in _RO_SYSTEM_PATHS:
        if os.path.islink(path):
            options += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            options += ["--ro-bind", path, path]
            bound.append(path)
    for path in _RO_OPTIONAL_PATHS:
        options += ["--ro-bind-try", path, path]
    options += ["--proc", "/proc", "--dev", "/dev"]
    options += ["--size", str(TMPFS_BYTES), "--perms", "1777", "--tmpfs", "/tmp"]
    # The interpreter's folders come after the private /tmp, so a virtualenv that lives under
    # the host's /tmp (a CI checkout, say) is bound on top of it rather than hidden by it.
    for path in _interpreter_dirs():
        if not any(path == b or path.startswith(b + os.sep) for b in bound):
            # bwrap would make missing parents (e.g. /root) as private as the host's copies,
            # which the unprivileged uid could not traverse.
            for parent in _ancestors(path):
                if parent not in ("/tmp", "/proc", "/dev"):
                    options += ["--perms", "0755", "--dir", parent]
            options += ["--ro-bind", path, path]
            bound.append(path)
    options += ["--perms", "0777", "--dir", SANDBOX_WORKDIR]
    options += ["--perms", "0444", "--file", str(program_fd), f"{SANDBOX_WORKDIR}/{PROGRAM_FILE}"]
    options += ["--chdir", SANDBOX_WORKDIR, "--clearenv"]
    for name, value in _environment(SANDBOX_WORKDIR, "/tmp").items():
        options += ["--setenv", name, value]
    return [*options, "--info-fd", str(info_fd)]


def _interpreter_dirs() -> list[str]:
    """The directories this interpreter and its packages live in, outermost first."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    candidates.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    dirs = sorted({os.path.realpath(path) for path in candidates} | candidates, key=len)
    kept: list[str] = []
    for path in dirs:
        if os.path.isdir(path) and not any(path.startswith(k + os.sep) for k in kept):
            kept.append(path)
    return kept


def _ancestors(path: str) -> list[str]:
    """ "/a/b/c" -> ["/a", "/a/b"]."""
    parts = path.strip(os.sep).split(os.sep)[:-1]
    return [os.sep + os.sep.join(parts[: i + 1]) for i in range(len(parts))]


def _run_weak(code: str, limits: _Limits, stdin: str | None) -> ExecutionResult:
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    try:
        with open(os.path.join(workdir, PROGRAM_FILE), "w", encoding="utf-8") as program_file:
            program_file.write(code)

        def command(report_fd: int, nonce_fd: int) -> list[str]:
            return _runner_argv(report_fd, nonce_fd, limits, 0, -1)

        return _run(
            command,
            limits,
            stdin,
            cwd=workdir,
            env=_environment(workdir, workdir),
            extra_fds=(),
            info_fd=None,
            mode=WEAK,
        )
    finally:
        _remove_tree(workdir)


# ---- running and observing ------------------------------------------------------------------


def _run(
    command: Callable[[int, int], list[str]],
    limits: _Limits,
    stdin: str | None,
    *,
    cwd: str | None,
    env: dict[str, str] | None,
    extra_fds: tuple[int, ...],
    info_fd: int | None,
    mode: str,
) -> ExecutionResult:
    """Start `command(report_fd, nonce_fd)` and judge the run; closes `extra_fds` (the child's
    copies) once it has started."""
    deadline = time.monotonic() + limits.timeout + KILL_GRACE_S
    nonce = secrets.token_hex(16)
    report_read, report_write = os.pipe()
    nonce_read, nonce_write = os.pipe()
    os.write(nonce_write, nonce.encode())
    os.close(nonce_write)
    try:
        process = subprocess.Popen(
            command(report_write, nonce_read),
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(report_write, nonce_read, *extra_fds),
            cwd=cwd,
            env=env if env is not None else {},
            start_new_session=True,
        )
    except BaseException:
        os.close(report_read)
        raise
    finally:
        os.close(report_write)
        os.close(nonce_read)
        for fd in extra_fds:
            os.close(fd)
    init = None
    try:
        if info_fd is not None:
            init = _namespace_init(info_fd, process.pid, deadline)
        outputs = _exchange(process, stdin, report_read, deadline)
        finished = _wait_unreaped(process.pid, deadline)
    finally:
        if init is not None:
            # Killing the pid namespace's init makes the kernel kill everything in it; bwrap
            # exits once the namespace is empty.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(init, signal.SIGKILL)
            os.close(init)
            _wait_unreaped(process.pid, time.monotonic() + _REAP_WAIT_S)
        # The group is killed before the child is reaped, while its id cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        os.close(report_read)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    returncode = process.returncode
    if mode == ISOLATED and returncode > 128:
        returncode = -(returncode - 128)  # bwrap reports a child killed by signal N as 128 + N
    return _verdict(outputs, finished, returncode, limits.timeout, nonce, mode)


def _namespace_init(info_fd: int, bwrap_pid: int, deadline: float) -> int | None:
    """A pidfd of the sandbox's pid-namespace init, from bwrap's --info-fd JSON; None if bwrap
    failed before starting it."""
    data = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(info_fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0 and selector.select(remaining):
            chunk = os.read(info_fd, _READ_CHUNK)
            if not chunk:
                break
            data += chunk
    try:
        pid = int(json.loads(data)["child-pid"])
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, TypeError, ProcessLookupError):
        return None
    if _parent_of(pid) != bwrap_pid:  # it died and the id was reused before we opened it
        os.close(pidfd)
        return None
    return pidfd


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class _Outputs:
    stdout: bytearray
    stderr: bytearray
    report: bytearray
    dropped_stdout: int = 0
    dropped_stderr: int = 0
    report_overflow: bool = False


def _exchange(
    process: subprocess.Popen[bytes], stdin: str | None, report_fd: int, deadline: float
) -> _Outputs:
    """Feed stdin and drain stdout, stderr and the report pipe until all close or time runs
    out; bytes past the caps are read and counted but not kept, so the child never blocks on a
    full pipe and the parent never holds more than a few MiB."""
    assert process.stdout is not None and process.stderr is not None
    outputs = _Outputs(bytearray(), bytearray(), bytearray())
    sinks = {
        process.stdout.fileno(): "stdout",
        process.stderr.fileno(): "stderr",
        report_fd: "report",
    }
    pending_input = memoryview(stdin.encode("utf-8")) if stdin is not None else None
    with selectors.DefaultSelector() as selector:
        for fd in sinks:
            selector.register(fd, selectors.EVENT_READ)
        stdin_fd = None
        if process.stdin is not None:
            stdin_fd = process.stdin.fileno()
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in selector.select(remaining):
                fd = key.fd
                if fd == stdin_fd:
                    assert pending_input is not None and process.stdin is not None
                    try:
                        pending_input = pending_input[os.write(fd, pending_input[:_READ_CHUNK]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending_input = pending_input[:0]
                    if not pending_input:
                        selector.unregister(fd)
                        process.stdin.close()
                    continue
                chunk = os.read(fd, _READ_CHUNK)
                if not chunk:
                    selector.unregister(fd)
                    continue
                _keep(outputs, sinks[fd], chunk)
    return outputs


def _keep(outputs: _Outputs, sink: str, chunk: bytes) -> None:
    if sink == "report":
        if len(outputs.report) + len(chunk) > _MAX_REPORT_BYTES:
            outputs.report_overflow = True
        else:
            outputs.report += chunk
        return
    buffer = outputs.stdout if sink == "stdout" else outputs.stderr
    room = max(0, MAX_OUTPUT_BYTES - len(buffer))
    buffer += chunk[:room]
    dropped = len(chunk) - min(room, len(chunk))
    if sink == "stdout":
        outputs.dropped_stdout += dropped
    else:
        outputs.dropped_stderr += dropped


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until the child exits or the deadline passes, without reaping it; True if it exited."""
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _verdict(
    outputs: _Outputs, finished: bool, returncode: int, timeout: float, nonce: str, mode: str
) -> ExecutionResult:
    stdout = _decode(outputs.stdout, outputs.dropped_stdout)
    stderr = _decode(outputs.stderr, outputs.dropped_stderr)
    report = _parse_report(outputs)
    token = str(report.get("nonce", "")) if report is not None else ""
    if finished and returncode == 0 and hmac.compare_digest(token.encode(), nonce.encode()):
        return ExecutionResult(True, stdout, stderr, mode=mode)
    if report is not None and isinstance(report.get("error"), str):
        # The runner's account of a failure (the program could have written it, but it can
        # only ever describe a failure).
        return ExecutionResult(
            False,
            stdout,
            stderr,
            report["error"],
            timeout=report.get("timeout") is True or not finished,
            memory_exceeded=report.get("memory_exceeded") is True,
            mode=mode,
        )
    # No usable report: we killed it, a limit's signal did, it crashed or left early.
    if not finished or returncode == -signal.SIGXCPU:
        error = f"timed out after {timeout:g} s; killed"
        return ExecutionResult(False, stdout, stderr, error, timeout=True, mode=mode)
    if "MemoryError" in stderr:
        return ExecutionResult(
            False, stdout, stderr, "MemoryError", memory_exceeded=True, mode=mode
        )
    if returncode < 0:
        try:
            error = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            error = f"killed by signal {-returncode}"
    else:
        error = f"exited with status {returncode} without a result"
    return ExecutionResult(False, stdout, stderr, error, mode=mode)


def _parse_report(outputs: _Outputs) -> dict | None:
    if outputs.report_overflow:
        return None
    try:
        report = json.loads(outputs.report)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _decode(data: bytearray, dropped: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if dropped:
        text += f"\n[output truncated: {dropped} more bytes]"
    return text


def _remove_tree(path: str) -> None:
    """Remove the working directory even if the program made parts of it unreadable."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for root, dirnames, _ in os.walk(path):
        for name in dirnames:
            child = os.path.join(root, name)
            # chmod would follow a symlink out of the tree.
            if not os.path.islink(child):
                os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)
