"""Run untrusted Python (HumanEval completions, model tool code) in a throwaway child process.

SPEC §10: each call starts a fresh isolated interpreter (`python -I`) in a new temporary working
directory with a minimal environment. Before the program runs, a small runner inside the child
caps its address space (RLIMIT_AS, 256 MiB by default), CPU time and file sizes, arms a
wall-clock alarm at `timeout`, and replaces destructive os/posix/shutil/subprocess functions and
the interactive builtins with stubs that raise PermissionError. stdin is /dev/null unless text is
given, so `input()` meets EOF instead of waiting. The parent kills the whole process group at
`timeout + 1` s whatever the child does (ignoring the alarm, blocking in C), reads at most 1 MiB
of each output stream, and always removes the directory.

The runner reports its verdict (success, error text, timeout, MemoryError) as JSON over a
separate pipe, so a program's own output can never be mistaken for it. The limits are set by the
runner rather than a `preexec_fn`, which is unsafe in a threaded parent such as an engine worker.

This guards against accidents -- a runaway loop, a `rmtree`, a memory bomb -- not a determined
attacker: `open(path, "w")` still works and anything can be undone with enough effort. Run
hostile code in a container.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MAX_OUTPUT_BYTES = 1024 * 1024
# Time the parent allows past `timeout` for the child's own alarm to end it, before SIGKILL.
KILL_GRACE_S = 1.0
# Below this the interpreter cannot even finish the runner's start-up.
MIN_MEMORY_LIMIT_MB = 32
PROGRAM_FILE = "program.py"
_MAX_FILE_BYTES = 64 * 1024 * 1024
_READ_CHUNK = 65536

# argv: report fd, timeout (s), address-space limit (bytes), file-size limit (bytes).
_RUNNER_SOURCE = r"""
import builtins, json, math, os, posix, resource, shutil, signal, subprocess, sys, traceback

report_fd = int(sys.argv[1])
timeout = float(sys.argv[2])
memory_bytes, file_bytes = int(sys.argv[3]), int(sys.argv[4])
with open("program.py", encoding="utf-8") as program_file:
    source = program_file.read()


class SandboxTimeout(BaseException):
    # A BaseException, so the program's `except Exception` cannot swallow it.
    pass


def disabled(name):
    def blocked(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    return blocked


outcome = {"success": False, "error": None, "timeout": False, "memory_exceeded": False}


def on_alarm(signum, frame):
    outcome["timeout"] = True
    raise SandboxTimeout


resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails instead of killing
cpu_seconds = math.ceil(timeout) + 1
resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
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
    # The limits above are hard limits, but root may raise even those.
    resource: "setrlimit prlimit",
    builtins: "exit quit help",
}
destructive[posix] = destructive[os]  # os re-exports posix; `import posix` must not bypass
for module, names in destructive.items():
    for name in names.split():
        if hasattr(module, name):
            setattr(module, name, disabled(f"{module.__name__}.{name}"))
for name in ("ctypes", "_ctypes", "_posixsubprocess"):
    sys.modules[name] = None  # importing them now raises ImportError

signal.signal(signal.SIGALRM, on_alarm)
try:
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    outcome["success"] = True
except SandboxTimeout:
    pass
except SystemExit as exc:
    outcome["success"] = exc.code in (None, 0)
    if not outcome["success"]:
        outcome["error"] = f"SystemExit: {exc.code}"
except BaseException as exc:
    outcome["memory_exceeded"] = isinstance(exc, MemoryError)
    try:
        outcome["error"] = "".join(traceback.format_exception_only(exc)).strip()[:10000]
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    except MemoryError:
        outcome["error"] = type(exc).__name__

if outcome["timeout"]:
    # Also when the program caught the timeout and went on to finish.
    outcome["success"] = False
    outcome["error"] = outcome["error"] or f"timed out after {timeout:g} s"
for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
    try:
        stream.flush()
    except Exception:
        pass
report = json.dumps(outcome).encode()
while report:
    report = report[os.write(report_fd, report):]
# Skip interpreter shutdown: a thread the program left running must not keep the child alive.
os._exit(0)
"""


@dataclass(frozen=True)
class ExecutionResult:
    """What running a program in the sandbox produced.

    success: the program ran to the end (or exited with status 0) without an exception.
    error: the exception as "Type: message" (or why the run ended) when not successful.
    timeout: the wall-clock limit was reached. memory_exceeded: a MemoryError was raised.
    """

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False


def run_python(
    code: str, timeout: float = 5.0, memory_limit_mb: int = 256, stdin: str | None = None
) -> ExecutionResult:
    """Run `code` as a program in the sandbox and report what happened.

    Returns within about `timeout + 1` seconds and leaves no process or directory behind.
    `stdin`, when given, is what the program reads from standard input; otherwise it reads EOF.
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

    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    try:
        with open(os.path.join(workdir, PROGRAM_FILE), "w", encoding="utf-8") as program_file:
            program_file.write(code)
        return _run_in(workdir, timeout, memory_limit_mb, stdin)
    finally:
        _remove_tree(workdir)


def _run_in(
    workdir: str, timeout: float, memory_limit_mb: int, stdin: str | None
) -> ExecutionResult:
    deadline = time.monotonic() + timeout + KILL_GRACE_S
    report_read, report_write = os.pipe()
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-X",
                "utf8",
                "-c",
                _RUNNER_SOURCE,
                str(report_write),
                repr(float(timeout)),
                str(memory_limit_mb * 1024 * 1024),
                str(_MAX_FILE_BYTES),
            ],
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(report_write,),
            cwd=workdir,
            env=_child_environment(workdir),
            start_new_session=True,
        )
    except BaseException:
        os.close(report_read)
        raise
    finally:
        os.close(report_write)
    try:
        outputs = _exchange(process, stdin, report_read, deadline)
        finished = _wait_unreaped(process.pid, deadline)
    finally:
        # The group is killed before the child is reaped, while its id cannot have been reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        os.close(report_read)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    return _verdict(outputs, finished, process.returncode, timeout)


def _child_environment(workdir: str) -> dict[str, str]:
    # Nothing from ours (secrets, database URLs) reaches the program. One malloc arena: each
    # extra arena reserves 64 MiB of address space, a quarter of the default limit.
    return {
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MALLOC_ARENA_MAX": "1",
        "OMP_NUM_THREADS": "1",
    }


@dataclass
class _Outputs:
    stdout: bytearray
    stderr: bytearray
    report: bytearray
    dropped_stdout: int = 0
    dropped_stderr: int = 0


def _exchange(
    process: subprocess.Popen[bytes], stdin: str | None, report_fd: int, deadline: float
) -> _Outputs:
    """Feed stdin and drain stdout, stderr and the report pipe until all close or time runs
    out; bytes past MAX_OUTPUT_BYTES are read and counted but not kept, so the child never
    blocks on a full pipe and the parent never holds more than a few MiB."""
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


def _verdict(outputs: _Outputs, finished: bool, returncode: int, timeout: float) -> ExecutionResult:
    stdout = _decode(outputs.stdout, outputs.dropped_stdout)
    stderr = _decode(outputs.stderr, outputs.dropped_stderr)
    try:
        report = json.loads(outputs.report)
    except ValueError:
        report = None
    if finished and isinstance(report, dict):
        return ExecutionResult(
            success=bool(report["success"]),
            stdout=stdout,
            stderr=stderr,
            error=report["error"],
            timeout=bool(report["timeout"]),
            memory_exceeded=bool(report["memory_exceeded"]),
        )
    # No verdict from the runner: we killed it, a limit's signal did, or it crashed.
    if not finished or returncode == -signal.SIGXCPU:
        error = f"timed out after {timeout:g} s; killed"
        return ExecutionResult(False, stdout, stderr, error, timeout=True)
    if "MemoryError" in stderr:
        return ExecutionResult(False, stdout, stderr, "MemoryError", memory_exceeded=True)
    if returncode < 0:
        error = f"killed by {signal.Signals(-returncode).name}"
    else:
        error = f"exited with status {returncode} without a result"
    return ExecutionResult(False, stdout, stderr, error)


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
