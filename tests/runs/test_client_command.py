"""The API client as a command: installed as `nanochat` (pyproject.toml), usable from any
directory, and quiet when the reader of its output goes away (`nanochat log 1 | head -1`).

The server is a stub answering one route with a large body: these tests are about the process,
not the API (tests/runs/test_client.py runs the client against the real server).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOG_LINES = 200_000  # megabytes of output: far more than a pipe buffers


class LogHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"lines": [f"line {i}" for i in range(LOG_LINES)]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), LogHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def installed_command() -> list[str]:
    script = Path(sys.executable).parent / "nanochat"
    if not script.exists():
        pytest.skip(f"{script} is not installed (make run / make test install it)")
    return [str(script)]


@pytest.mark.parametrize("how", ["installed", "module"])
def test_a_closed_pipe_ends_the_client_quietly(stub_url, tmp_path, how):
    if how == "installed":  # from a directory that is not the repository
        argv, cwd = installed_command(), tmp_path
    else:
        argv, cwd = [sys.executable, "-m", "runs.client"], ROOT
    result = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$@" | head -1', "_", *argv,
         "--url", stub_url, "log", "1"],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.stdout == "line 0\n"
    assert result.stderr == ""  # no traceback, no "[Errno 32] Broken pipe"
    assert result.returncode == 141  # what a shell reports for a writer that SIGPIPE ended


def test_installed_command_names_itself(tmp_path):
    result = subprocess.run([*installed_command(), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("usage: nanochat ")


def test_pyproject_installs_every_product_package_and_the_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"nanochat": "runs.client:main"}
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    top_level = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert top_level == {pattern.rstrip("*") for pattern in include}
