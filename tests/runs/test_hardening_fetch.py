"""Issue 13, reproduction 3: a dataset's `base_url` must not make the server fetch for a user
from its own network or its own files.

Through the real API as a non-staff user: loopback, private, link-local and IPv6 loopback
hosts, other spellings of 127.0.0.1, `file:`, `ftp:` and `gopher:` are refused with a field
error on `options.base_url`, and a real local HTTP server that records requests receives none.
With the admin allow-list naming that server the dataset is accepted and the command line the
worker would run, with the environment the worker gives it, builds it; the same command refuses
once the admin's list no longer names the server (the program checks again when it fetches),
and a redirect from the allowed server to a host that is not allowed is refused.
"""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import threading
from pathlib import Path

import pytest

from runs.execution import child_env
from runs.models import Dataset, Run
from runs.programs import dataset_commands
from training import dataset as dataset_program

pytestmark = pytest.mark.django_db


class _RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory of shards and records every request; redirects when asked to."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.server.redirect:
            self.send_response(302)
            self.send_header("Location", self.server.redirect + self.path)
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path):
    """serve(redirect="") -> a started local HTTP server with `requests` and `url`."""
    remote = tmp_path / "remote"
    for i in range(2):
        dataset_program.write_shard(remote / dataset_program.SHARD_NAME.format(index=i),
                                    [f"document {i}.{j}" for j in range(4)])  # fmt: skip
    servers = []

    def start(redirect: str = "") -> http.server.ThreadingHTTPServer:
        handler = functools.partial(_RecordingHandler, directory=str(remote))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.requests, server.redirect = [], redirect
        server.url = f"http://127.0.0.1:{server.server_port}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


REFUSED = [
    ("{local}/", "loopback"),
    ("http://localhost:{port}/", "loopback"),
    ("http://2130706433:{port}/", "loopback"),
    ("http://0x7f.1:{port}/", "loopback"),
    ("http://good.example@127.0.0.1:{port}/", "loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/", "loopback IPv4 (127.0.0.1) inside an IPv6"),
    ("http://10.0.0.1/", "private"),
    ("http://[::1]/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("file:///etc", "file: is not allowed"),
    ("file://{tmp}/remote", "file: is not allowed"),
    ("ftp://127.0.0.1:{port}/", "ftp: is not allowed"),
    ("gopher://127.0.0.1:{port}/_GET", "gopher: is not allowed"),
]


def _body(name: str, base_url: str, key: str = "base_url") -> dict:
    return {"name": name, "source": "download", "options": {key: base_url, "num_shards": 2}}


@pytest.mark.parametrize(("url", "problem"), REFUSED, ids=[u for u, _ in REFUSED])
def test_a_user_cannot_point_a_download_at_the_server_or_its_files(
    api, alice, serve, tmp_path, url, problem
):
    server = serve()
    url = url.format(local=server.url, port=server.server_port, tmp=tmp_path)
    response = api(alice).post("/api/datasets/", _body("mine", url), format="json")
    assert response.status_code == 400, response.content
    [message] = response.json()["options.base_url"]
    assert problem in message
    assert not Dataset.objects.exists() and not Run.objects.exists()
    assert server.requests == []


def test_the_dashed_option_name_is_checked_too(api, alice, serve):
    server = serve()
    response = api(alice).post("/api/datasets/", _body("d", server.url, "base-url"), format="json")
    assert response.status_code == 400, response.content
    [message] = response.json()["options.base_url"]
    assert message.endswith("unless an admin adds the host to NANOCHAT_FETCH_ALLOWED_HOSTS")
    assert server.requests == []


@pytest.mark.parametrize("url", [dataset_program.FINEWEB_BASE_URL, "https://8.8.8.8/shards/"])
def test_public_sources_are_accepted(api, alice, url):
    # The flag's default needs no lookup in the request (the program checks it when fetching);
    # a public address literal needs none either, so this runs offline.
    response = api(alice).post("/api/datasets/", _body("public", url), format="json")
    assert response.status_code == 201, response.content
    assert Run.objects.get(pk=response.json()["run"]).config["base_url"] == url


def test_an_allowed_server_builds_and_the_program_checks_again(api, alice, serve, settings):
    server = serve()
    settings.FETCH_ALLOWED_HOSTS = [f"127.0.0.1:{server.server_port}"]
    response = api(alice).post("/api/datasets/", _body("mine", server.url), format="json")
    assert response.status_code == 201, response.content
    run = Run.objects.get(pk=response.json()["run"])
    [argv] = dataset_commands(run)
    built = subprocess.run(argv, cwd=settings.BASE_DIR, env=child_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert sorted(server.requests) == ["/shard_00000.parquet", "/shard_00001.parquet"]
    path = Path(Dataset.objects.get(pk=response.json()["id"]).path)
    assert dataset_program.dataset_stats(path).documents == 8

    # The admin takes the host off the list: the same command, rerun, fetches nothing.
    settings.FETCH_ALLOWED_HOSTS = []
    for shard in dataset_program.list_shards(path):
        shard.unlink()
    again = subprocess.run(argv, cwd=settings.BASE_DIR, env=child_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 1
    assert "127.0.0.1 is a loopback address" in again.stderr
    assert len(server.requests) == 2 and dataset_program.list_shards(path) == []


def test_a_redirect_from_the_allowed_server_to_another_host_is_refused(
    serve, tmp_path, monkeypatch
):
    inner = serve()
    outer = serve(redirect=f"http://localhost:{inner.server_port}")
    out = tmp_path / "out"
    monkeypatch.setenv("NANOCHAT_FETCH_ALLOWED_HOSTS", f"127.0.0.1:{outer.server_port}")
    with pytest.raises(dataset_program.DownloadError) as info:
        dataset_program.download_shards(out, [0, 1], outer.url, attempts=3, backoff_s=0)
    assert set(info.value.failures) == {"shard_00000.parquet", "shard_00001.parquet"}
    for error in info.value.failures.values():
        assert re.match(r"FetchRefused: localhost \(\S+\) is a loopback address", error), error
    assert sorted(outer.requests) == ["/shard_00000.parquet", "/shard_00001.parquet"]  # no retry
    assert inner.requests == []
    assert dataset_program.list_shards(out) == []
