"""The Python sandbox (engine/sandbox.py): capture, failures, limits, blocked calls, cleanup.

These hold in either mode; where namespaces are not usable the module runs in weak mode (the
isolation itself is tested in test_sandbox_escapes.py).
"""

import os
import tempfile
import textwrap
import threading
import time

import psutil
import pytest

from engine import sandbox
from engine.sandbox import KILL_GRACE_S, MAX_OUTPUT_BYTES, ExecutionResult, run_python

# Seconds a timed-out run may take beyond its timeout: the kill grace plus start-up and slack.
OVERRUN_S = KILL_GRACE_S + 1.0


@pytest.fixture(autouse=True)
def usable_mode(monkeypatch):
    monkeypatch.setenv(sandbox.SANDBOX_MODE_ENV, sandbox.WEAK)
    return sandbox.sandbox_mode()


def test_captures_stdout_and_stderr(usable_mode):
    result = run_python("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert result == ExecutionResult(
        success=True, stdout="hello 42\n", stderr="warn\n", mode=usable_mode
    )


def test_humaneval_style_program_passes_and_fails_on_its_asserts():
    program = textwrap.dedent(
        """
        def add(a, b):
            return a + b

        def check(candidate):
            assert candidate(2, 3) == 5
            assert candidate(-1, 1) == {expected}

        check(add)
        """
    )
    assert run_python(program.format(expected=0)).success
    failed = run_python(program.format(expected=1))
    assert not failed.success
    assert failed.error == "AssertionError"
    assert not failed.timeout and not failed.memory_exceeded


def test_exception_gives_its_text_and_a_traceback_of_the_program():
    result = run_python("print('before')\ndef f():\n    raise ValueError('bad value')\nf()")
    assert not result.success
    assert result.stdout == "before\n"
    assert result.error == "ValueError: bad value"
    assert 'File "program.py", line 3, in f' in result.stderr
    assert "raise ValueError('bad value')" in result.stderr


def test_syntax_error_is_a_failure():
    result = run_python("def broken(:\n    pass")
    assert not result.success
    assert "SyntaxError" in result.error


@pytest.mark.parametrize("status", [0, 3])
def test_leaving_early_is_a_failure_even_with_status_0(status):
    # The tests after an early exit never ran, so the program did not pass them.
    result = run_python(f"import sys\nprint('x')\nsys.exit({status})\nassert False")
    assert not result.success
    assert result.stdout == "x\n"
    assert result.error == f"SystemExit: {status}"


@pytest.mark.parametrize(
    "program",
    [
        "while True:\n    pass",
        "import time\ntime.sleep(60)",
        # Catching the timeout does not turn it into a success.
        "try:\n    while True:\n        pass\nexcept BaseException:\n    pass\nprint('done')",
        # Ignoring the alarm leaves the CPU-time limit and the parent's hard kill...
        "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass",
        # ...and only the kill when no CPU time is used.
        "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ntime.sleep(60)",
    ],
)
def test_timeout_stops_the_program(program):
    timeout = 1.0
    start = time.monotonic()
    result = run_python(program, timeout=timeout)
    elapsed = time.monotonic() - start
    assert result.timeout
    assert not result.success
    assert "timed out" in result.error
    assert timeout <= elapsed < timeout + OVERRUN_S


@pytest.mark.parametrize("program", ["x = bytearray(1024**3)", "x = [0] * (1024**3 // 8)"])
def test_memory_limit(program):
    result = run_python(program)
    assert result.memory_exceeded
    assert not result.success
    assert not result.timeout
    assert "MemoryError" in result.error


def test_memory_limit_is_the_one_asked_for():
    program = "x = bytearray(200 * 1024 * 1024)\nprint(len(x))"
    assert run_python(program, memory_limit_mb=512).success
    assert run_python(program, memory_limit_mb=128).memory_exceeded


@pytest.mark.parametrize(
    "call",
    [
        "os.remove(TARGET)",
        "os.unlink(TARGET)",
        "posix.unlink(TARGET)",
        "os.rename(TARGET, TARGET + '.moved')",
        "os.replace(TARGET, TARGET + '.moved')",
        "os.truncate(TARGET, 0)",
        "os.chmod(TARGET, 0)",
        "shutil.rmtree(os.path.dirname(TARGET))",
        "shutil.move(TARGET, TARGET + '.moved')",
        "os.system('rm ' + TARGET)",
        "subprocess.run(['rm', TARGET])",
        "subprocess.Popen(['rm', TARGET]).wait()",
        "os.execv('/bin/rm', ['rm', TARGET])",
        "os.fork()",
        "os.kill(os.getpid(), 0)",
        "import ctypes",
    ],
)
def test_destructive_calls_are_blocked(tmp_path, call):
    target = tmp_path / "keep.txt"
    target.write_text("precious")
    program = f"import os, posix, shutil, subprocess\nTARGET = {str(target)!r}\n{call}\n"
    result = run_python(program)
    assert not result.success
    assert (
        "PermissionError" in result.error
        or "ImportError" in result.error
        or ("ModuleNotFoundError" in result.error)
    )
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert os.stat(target).st_mode & 0o777 != 0


def test_stdin_reads_eof_unless_given():
    result = run_python("input()")
    assert not result.success
    assert "EOFError" in result.error
    assert run_python("import sys\nprint(repr(sys.stdin.read()))").stdout == "''\n"
    echoed = run_python("import sys\nprint(sys.stdin.read()[::-1])", stdin="olleh")
    assert echoed.stdout == "hello\n"


def test_large_stdin_is_fed_without_deadlock():
    text = "x" * (3 * 1024 * 1024)
    result = run_python("import sys\nprint(len(sys.stdin.read()))", stdin=text)
    assert result.stdout == f"{len(text)}\n"


def test_output_is_capped():
    result = run_python("import sys\nsys.stdout.write('x' * (3 * 1024 * 1024))\nprint('end')")
    assert result.success
    assert result.stdout.startswith("x" * 1000)
    assert len(result.stdout) < MAX_OUTPUT_BYTES + 100
    assert "[output truncated" in result.stdout


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = run_python("import os\nprint('NANOCHAT_TEST_SECRET' in os.environ)")
    assert result.stdout == "False\n"


def test_working_directory_is_fresh_and_nothing_stays_on_the_host():
    program = (
        "import os\nprint(sorted(os.listdir('.')))\n"
        "open('scratch.txt', 'w').write('x')\nos.mkdir('sub')\nprint(os.getcwd())"
    )
    before = set(os.listdir(tempfile.gettempdir()))
    first = run_python(program)
    second = run_python(program)
    assert first.success and second.success
    assert first.stdout.splitlines()[0] == second.stdout.splitlines()[0] == "['program.py']"
    assert not any(
        name.startswith("nanochat-sandbox-")
        for name in set(os.listdir(tempfile.gettempdir())) - before
    )
    for result in (first, second):
        workdir = result.stdout.splitlines()[1]
        assert not os.path.exists(os.path.join(workdir, "scratch.txt"))


def test_no_process_is_left_behind():
    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    run_python("import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()")
    run_python(
        "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ntime.sleep(60)", 0.5
    )
    after = {child.pid for child in me.children(recursive=True)}
    assert after <= before


def test_concurrent_runs_from_threads_stay_separate():
    results: dict[int, ExecutionResult] = {}

    def run(index):
        results[index] = run_python(f"print({index} * 11)")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i * 11}\n" for i in range(4)}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"code": b"print(1)"}, TypeError, "code must be a str"),
        ({"code": "", "timeout": 0}, ValueError, "timeout must be a positive"),
        ({"code": "", "timeout": float("inf")}, ValueError, "timeout must be a positive"),
        ({"code": "", "memory_limit_mb": 8}, ValueError, "memory_limit_mb must be at least"),
        ({"code": "", "stdin": b"x"}, TypeError, "stdin must be a str"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        run_python(**kwargs)
