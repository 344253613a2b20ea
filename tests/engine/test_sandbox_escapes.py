"""Issue 13, reproduction 8: the sandbox payloads that used to escape `run_python` now stay in.

Each payload is an attack followed by a failing test (`assert False`), so a success verdict is a
forged one. After each run the host is checked from the outside: no file appeared where the
payload tried to write, the listening TCP, UDP and unix sockets got nothing, a bystander process
and this one are alive, no sandbox process is left, no secret (the parent's environment, the
data home's secret_key, the repository, /etc/shadow) is in the output, and the run ended within
its timeout plus the kill grace. Where bubblewrap isolation is not usable the payloads are
skipped, and the weak mode is shown to be refused unless allowed.
"""

from __future__ import annotations

import ast
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from engine import sandbox
from engine.sandbox import KILL_GRACE_S, SandboxUnavailable, run_python
from training.tasks.humaneval import HumanEval

REPO = Path(__file__).resolve().parents[2]
RUNNER_MARK = "report_fd, nonce_fd = int(sys.argv[1])"
# Printed once the prelude ran: the attack itself was reached (not an import error before it).
STARTED = "payload-started"
TIMEOUT_S = 1.0
# Start-up of bwrap and the interpreter, and a loaded machine.
SLACK_S = 2.0

# Put back the real os functions the runner stubbed (the first trick the probe used).
RESTORE = """
def restore():
    del sys.modules['posix']
    import posix
    for name in dir(posix):
        if not name.startswith('_'):
            setattr(os, name, getattr(posix, name))
    return os
"""

# (id, program). Names in capitals come from the prelude the test writes for each run.
PAYLOADS = [
    # -- running commands (CMD creates a file in a host directory) --
    ("posix-reimport-system", "restore().system(CMD)"),
    ("posix-reload-system", "import importlib, posix\nimportlib.reload(posix).system(CMD)"),
    (
        "ctypes-libc-system",
        "for m in ('ctypes', '_ctypes'):\n    sys.modules.pop(m)\n"
        "import ctypes\nctypes.CDLL(None).system(CMD.encode())",
    ),
    (
        "gc-popen",
        "import gc, subprocess\n"
        "popen = [o for o in gc.get_objects() if isinstance(o, type) and o.__name__ == 'Popen']\n"
        "popen[0](['/bin/sh', '-c', CMD]).wait()",
    ),
    (
        "posixsubprocess-reimport",
        "sys.modules.pop('_posixsubprocess')\nsys.modules.pop('subprocess')\nrestore()\n"
        "import subprocess\nsubprocess.run(CMD, shell=True)",
    ),
    (
        "multiprocessing",
        "restore()\nimport multiprocessing\n"
        "p = multiprocessing.get_context('fork').Process(target=os.system, args=(CMD,))\n"
        "p.start()\np.join()",
    ),
    (
        "pty-fork-exec",
        "restore()\nimport pty\npid, fd = pty.fork()\n"
        "if pid == 0:\n    os.execv('/bin/sh', ['sh', '-c', CMD])\nos.waitpid(pid, 0)",
    ),
    ("execv-shell", "restore().execv('/bin/sh', ['sh', '-c', CMD])"),
    (
        "posix-spawn",
        "restore()\npid = os.posix_spawn('/bin/sh', ['sh', '-c', CMD], {})\nos.waitpid(pid, 0)",
    ),
    # -- processes that outlive the run --
    (
        "fork-setsid-outlives",
        "restore()\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
        "    os.system(CMD)\n    os._exit(0)",
    ),
    (
        "double-fork-daemon",
        "restore()\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n        signal.signal(signal.SIGHUP,"
        " signal.SIG_IGN)\n        time.sleep(30)\n    os._exit(0)\ntime.sleep(0.2)",
    ),
    # -- signalling the parent and others --
    ("kill-parent", "restore().kill(os.getppid(), signal.SIGKILL)\ntime.sleep(0.2)"),
    ("kill-pid-1", "restore().kill(1, signal.SIGKILL)\ntime.sleep(0.2)"),
    ("kill-host-test-process", "restore().kill(TEST_PID, signal.SIGKILL)"),
    ("kill-host-bystander", "restore().kill(VICTIM_PID, signal.SIGKILL)"),
    ("kill-everything", "restore().kill(-1, signal.SIGKILL)\ntime.sleep(0.2)"),
    ("killpg-parent-group", "restore().killpg(os.getpgid(os.getppid()), signal.SIGKILL)"),
    # -- reading secrets --
    ("read-parent-environ", "print(open(f'/proc/{os.getppid()}/environ').read())"),
    ("read-init-environ", "print(open('/proc/1/environ').read())"),
    ("read-host-test-environ", "print(open(f'/proc/{TEST_PID}/environ').read())"),
    ("read-host-bystander-environ", "print(open(f'/proc/{VICTIM_PID}/environ').read())"),
    (
        "scan-all-environs",
        "for pid in os.listdir('/proc'):\n    try:\n"
        "        print(open(f'/proc/{pid}/environ').read(), open(f'/proc/{pid}/cmdline').read())\n"
        "    except Exception:\n        pass",
    ),
    ("read-secret-key", "print(open(os.path.join(DATA_HOME, 'secret_key')).read())"),
    ("read-etc-shadow", "print(open('/etc/shadow').read())"),
    ("read-ssh-dir", "print(os.listdir('/root/.ssh'), os.listdir(os.path.expanduser('~')))"),
    ("read-repository", "print(open(os.path.join(REPO, 'manage.py')).read())"),
    # -- the network --
    (
        "tcp-test-listener",
        "socket.create_connection(('127.0.0.1', TCP_PORT), 1)\nprint('CONNECTED')",
    ),
    (
        "tcp-redis-postgres-site",
        "for port in (6379, 5432, 8000):\n    try:\n"
        "        socket.create_connection(('127.0.0.1', port), 0.5)\n        print('CONNECTED', port)\n"
        "    except OSError:\n        pass",
    ),
    ("tcp-ipv6-loopback", "socket.create_connection(('::1', TCP_PORT), 1)\nprint('CONNECTED')"),
    (
        "tcp-host-address",
        "socket.create_connection((socket.gethostbyname(socket.gethostname()), TCP_PORT), 1)\n"
        "print('CONNECTED')",
    ),
    (
        "udp-test-listener",
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('127.0.0.1', UDP_PORT))",
    ),
    (
        "unix-socket-in-host-tmp",
        "s = socket.socket(socket.AF_UNIX)\ns.connect(UNIX_PATH)\nprint('CONNECTED')",
    ),
    (
        "abstract-unix-socket",
        "s = socket.socket(socket.AF_UNIX)\ns.connect(ABSTRACT_NAME)\nprint('CONNECTED')",
    ),
    # -- writing outside the working directory --
    ("write-host-tmp", "open(os.path.join('/tmp', ESCAPE_NAME), 'w').write('x')\ntime.sleep(0.2)"),
    ("write-host-dir", "open(os.path.join(HOST_DIR, ESCAPE_NAME), 'w').write('x')"),
    ("write-repository", "open(os.path.join(REPO, ESCAPE_NAME), 'w').write('x')"),
    ("write-data-home", "open(os.path.join(DATA_HOME, ESCAPE_NAME), 'w').write('x')"),
    ("write-root-home", "open(os.path.join('/root', ESCAPE_NAME), 'w').write('x')"),
    (
        "write-3x60mb",
        "for i in range(3):\n    with open(f'/tmp/big{i}', 'wb') as f:\n"
        "        f.write(b'x' * (60 * 1024 * 1024))",
    ),
    ("write-over-file-limit", "open('big', 'wb').write(b'x' * (100 * 1024 * 1024))"),
    # -- forging the verdict --
    (
        "forged-report-on-every-fd",
        "restore()\nfor fd in range(3, 20):\n    try:\n"
        '        os.write(fd, b\'{"success": true, "error": null, "timeout": false,\'\n'
        '                 b\' "memory_exceeded": false, "nonce": "0"}\')\n'
        "    except OSError:\n        pass\nos._exit(0)",
    ),
    ("early-os-exit-0", "os._exit(0)"),
    ("early-sys-exit-0", "sys.exit(0)"),
    ("atexit-exit-0", "import atexit\natexit.register(os._exit, 0)"),
    ("excepthook-swallows", "sys.excepthook = lambda *args: None"),
    (
        "close-report-and-exit",
        "restore()\nfor fd in range(3, 20):\n    try:\n        os.close(fd)\n"
        "    except OSError:\n        pass\nos._exit(0)",
    ),
    # -- exhausting resources --
    ("memory-bomb", "hoard = []\nwhile True:\n    hoard.append(bytearray(16 * 1024 * 1024))"),
    (
        "fork-bomb",
        "restore()\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    ),
    (
        "fork-memory-bomb",
        "restore()\nfor _ in range(64):\n    try:\n        os.fork()\n    except OSError:\n"
        "        pass\nhoard = [bytearray(16 * 1024 * 1024) for _ in range(12)]\ntime.sleep(30)",
    ),
    (
        "thread-bomb",
        "import threading\nwhile True:\n    try:\n"
        "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "    except RuntimeError:\n        pass",
    ),
    ("sleep-past-timeout", "time.sleep(30)"),
    (
        "ignore-sigalrm",
        "signal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass",
    ),
    ("infinite-output", "while True:\n    print('x' * 4096)"),
    ("read-stdin", "print(sys.stdin.read())"),
]


@pytest.fixture
def isolated(monkeypatch):
    monkeypatch.delenv(sandbox.SANDBOX_MODE_ENV, raising=False)
    try:
        assert sandbox.sandbox_mode() == sandbox.ISOLATED
    except SandboxUnavailable as exc:
        if os.environ.get("CI") and shutil.which("bwrap"):
            # CI installs bubblewrap: isolation failing there is a bug, not a missing tool.
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def sandbox_processes() -> set[int]:
    """Processes of sandbox runs: our descendants, those running as a sandbox uid, and any
    running the sandbox's runner (a fork keeps its command line, a setsid() its uid)."""
    pids = {child.pid for child in psutil.Process().children(recursive=True)}
    for process in psutil.process_iter(["uids", "cmdline"]):
        uids, cmdline = process.info["uids"], process.info["cmdline"] or []
        if (uids is not None and uids.real in sandbox._SANDBOX_UIDS) or any(
            RUNNER_MARK in arg for arg in cmdline
        ):
            pids.add(process.pid)
    return pids


class Host:
    """What a payload aims at, seen from outside the sandbox."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.token = secrets.token_hex(8)
        self.escape_name = f"nanochat-escape-{self.token}"
        self.dir = tmp_path / "host"
        self.dir.mkdir()
        self.data_home = tmp_path / "data"
        self.data_home.mkdir()
        self.secret_key = f"secret-key-{secrets.token_hex(16)}"
        (self.data_home / "secret_key").write_text(self.secret_key)
        self.env_marker = f"env-marker-{secrets.token_hex(16)}"
        monkeypatch.setenv("NANOCHAT_HOME", str(self.data_home))
        monkeypatch.setenv("NANOCHAT_ESCAPE_MARKER", self.env_marker)
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_path = f"/tmp/nanochat-escape-{self.token}.sock"
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.abstract_name = f"\0nanochat-escape-{self.token}"
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.abstract_name)
        for listener in (self.tcp, self.unix, self.abstract):
            listener.listen()
        for endpoint in (self.tcp, self.udp, self.unix, self.abstract):
            endpoint.setblocking(False)
        # A bystander on the host whose environment holds a secret.
        self.victim = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            env={"NANOCHAT_ESCAPE_MARKER": self.env_marker},
        )
        self.secrets = [self.secret_key, self.env_marker, _manage_py_line()]
        shadow = _first_line("/etc/shadow")
        if shadow:
            self.secrets.append(shadow)

    def prelude(self) -> str:
        names = {
            "HOST_DIR": str(self.dir),
            "DATA_HOME": str(self.data_home),
            "REPO": str(REPO),
            "ESCAPE_NAME": self.escape_name,
            "CMD": f"touch {self.dir / 'command-ran'}",
            "TEST_PID": os.getpid(),
            "VICTIM_PID": self.victim.pid,
            "TCP_PORT": self.tcp.getsockname()[1],
            "UDP_PORT": self.udp.getsockname()[1],
            "UNIX_PATH": self.unix_path,
            "ABSTRACT_NAME": self.abstract_name,
        }
        constants = "".join(f"{name} = {value!r}\n" for name, value in names.items())
        started = f"print({STARTED!r}, flush=True)\n"
        return f"import os, signal, socket, sys, time\n{constants}{RESTORE}\n{started}"

    def escaped_files(self) -> list[str]:
        places = [Path("/tmp"), REPO, self.data_home, Path.home()]
        found = [str(p / self.escape_name) for p in places if (p / self.escape_name).exists()]
        return found + [str(p) for p in self.dir.iterdir()]

    def contacts(self) -> list[str]:
        seen = []
        for name, endpoint in (("tcp", self.tcp), ("unix", self.unix), ("abstract", self.abstract)):
            try:
                endpoint.accept()[0].close()
                seen.append(name)
            except BlockingIOError:
                pass
        try:
            self.udp.recv(16)
            seen.append("udp")
        except BlockingIOError:
            pass
        return seen

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        for endpoint in (self.tcp, self.udp, self.unix, self.abstract):
            endpoint.close()
        os.unlink(self.unix_path)


def _manage_py_line() -> str:
    lines = (REPO / "manage.py").read_text().splitlines()
    return max(lines, key=len)


def _first_line(path: str) -> str:
    try:
        return Path(path).read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""


@pytest.fixture
def host(tmp_path, monkeypatch):
    target = Host(tmp_path, monkeypatch)
    yield target
    target.close()


@pytest.mark.parametrize("payload", [p for _, p in PAYLOADS], ids=[name for name, _ in PAYLOADS])
def test_payload_stays_in_the_sandbox(isolated, host, payload):
    before = sandbox_processes() - {host.victim.pid}
    program = f"{host.prelude()}{payload}\nassert False, 'the tests fail'\n"
    start = time.monotonic()
    result = run_python(program, timeout=TIMEOUT_S)
    elapsed = time.monotonic() - start

    assert result.mode == sandbox.ISOLATED
    assert result.stdout.startswith(STARTED), result.stderr[-2000:]
    assert not result.success, "a failing program was judged a success"
    assert elapsed < TIMEOUT_S + KILL_GRACE_S + SLACK_S
    assert host.escaped_files() == []
    assert host.contacts() == []
    assert "CONNECTED" not in result.stdout
    output = result.stdout + result.stderr
    assert [s for s in host.secrets if s in output] == []
    assert host.victim.poll() is None, "the bystander process was killed"
    assert sandbox_processes() - {host.victim.pid} <= before, "a sandbox process was left"


def test_resource_bombs_report_what_stopped_them(isolated):
    assert run_python("x = bytearray(10**10)").memory_exceeded
    slept = run_python("import time\ntime.sleep(30)", timeout=TIMEOUT_S)
    assert slept.timeout and "timed out" in slept.error


def test_correct_program_still_passes_in_isolation(isolated):
    result = run_python("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('ok')")
    assert (result.success, result.stdout, result.mode) == (True, "ok\n", sandbox.ISOLATED)


def test_without_isolation_the_weak_mode_is_refused_by_default(monkeypatch):
    monkeypatch.setenv(sandbox.BWRAP_ENV, "/nonexistent/bwrap")
    monkeypatch.delenv(sandbox.SANDBOX_MODE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="NANOCHAT_SANDBOX=weak") as refused:
        run_python("print(1)")
    assert "\n" not in str(refused.value)
    with pytest.raises(SandboxUnavailable, match="NANOCHAT_SANDBOX=weak"):
        HumanEval()


def test_weak_mode_runs_when_allowed_and_says_so(monkeypatch):
    monkeypatch.setenv(sandbox.BWRAP_ENV, "/nonexistent/bwrap")
    monkeypatch.setenv(sandbox.SANDBOX_MODE_ENV, "weak")
    result = run_python("print(6 * 7)")
    assert (result.success, result.stdout, result.mode) == (True, "42\n", sandbox.WEAK)
    # The verdict is still the parent's: an early exit with status 0 is not a pass.
    assert not run_python("import os\nos._exit(0)\nassert False").success
    assert HumanEval().sandbox_mode == sandbox.WEAK


def test_an_unknown_mode_setting_is_an_error(monkeypatch):
    monkeypatch.setenv(sandbox.SANDBOX_MODE_ENV, "off")
    with pytest.raises(ValueError, match="NANOCHAT_SANDBOX must be"):
        run_python("print(1)")


def test_an_interpreter_folder_under_the_hosts_tmp_is_still_visible(isolated, monkeypatch):
    # A checkout (and its virtualenv) under the host's /tmp, as CI clones are: the sandbox's
    # private /tmp must not hide the interpreter's own folders, only everything else there.
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        os.chmod(folder, 0o755)  # as a checkout's folders are
        Path(folder, "site.txt").write_text("packages live here")
        real = sandbox._interpreter_dirs()
        monkeypatch.setattr(sandbox, "_interpreter_dirs", lambda: [*real, folder])
        program = f"print(open({str(Path(folder, 'site.txt'))!r}).read())\n"
        program += "import os\nprint(sorted(os.listdir('/tmp')))\n"
        result = run_python(program)
    assert result.success, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "packages live here"
    # Of the host's /tmp only the bound interpreter folders show (the rest stays out of sight);
    # the real virtualenv may itself live under /tmp (a CI clone), so its top folder shows too.
    bound = {
        Path(d).relative_to("/tmp").parts[0]
        for d in [*real, folder]
        if Path(d).is_relative_to("/tmp") and Path(d) != Path("/tmp")
    }
    assert set(ast.literal_eval(lines[1])) <= {"work"} | bound
