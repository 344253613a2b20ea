"""Issue 13, reproductions 5, 6 and part of 9: bounded parsing of everything a client sends.

Each test replays a finding against the real entry points (the REST API, the OpenAI API, both
websockets through the site's routes, the pages, dataset uploads, the real web server) and
asserts the safe outcome: a 400 or an error frame that names the problem, the socket still
answering, nothing left on disk -- and never a 500, a 1011 close or a silently dropped socket.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import websockets.sync.client
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from websockets.exceptions import ConnectionClosedError

from nanochat_site import limits
from nanochat_site.routing import websocket_urlpatterns
from runs import services
from runs.models import Dataset, Kind, MetricPoint, Run
from tests.chat.conftest import open_socket, run
from tests.site.site_process import REPO, free_port
from training.flags import ConfigError

DEEP_100K = "[" * 100_000 + "]" * 100_000
DEEP_1M = "[" * 1_000_000  # unbalanced, but under the size limit: the depth is the problem
DEPTH_MESSAGE = f"JSON nested deeper than {64} levels"
TOO_BIG_BODY = json.dumps({"name": "x" * (2 * 1024 * 1024)})


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice")


@pytest.fixture
def signed_in(alice) -> APIClient:
    client = APIClient()
    client.force_login(alice)
    return client


@pytest.fixture
def bearer(alice) -> Client:
    key = Token.objects.get_or_create(user=alice)[0].key
    return Client(headers={"Authorization": f"Bearer {key}"})


# ---- the parser itself ---------------------------------------------------------------------


def test_parse_json_limits_depth_size_and_constants():
    assert limits.parse_json("[" * 64 + "]" * 64) is not None
    assert limits.parse_json(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    for deep in ("[" * 65 + "]" * 65, '{"a":' * 65 + "1" + "}" * 65, DEEP_100K, DEEP_1M):
        with pytest.raises(limits.InputError, match=DEPTH_MESSAGE):
            limits.parse_json(deep)
    exactly = '"' + "x" * (settings.API_MAX_BODY_BYTES - 2) + '"'
    assert len(limits.parse_json(exactly)) == settings.API_MAX_BODY_BYTES - 2
    with pytest.raises(limits.InputError, match="frame is larger than 1048576 bytes"):
        limits.parse_json(exactly + " ", what="frame")
    with pytest.raises(limits.InputError, match="larger than"):
        limits.parse_json("é" * (settings.API_MAX_BODY_BYTES // 2 + 1))  # bytes, not characters
    for bad in ("NaN", "[Infinity]", "{", b"\xff\xfe"):
        with pytest.raises(limits.InputError, match="not valid"):
            limits.parse_json(bad)


def test_a_wide_document_is_measured_without_recursion_in_linear_time():
    wide = json.dumps([[i, {"k": [i]}] for i in range(30_000)])  # 90k containers, depth 4
    # A recursion limit just above the document's depth: a measure that recursed per
    # container (or per sibling) would raise here.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 40)
    try:
        started = time.process_time()
        assert len(limits.parse_json(wide)) == 30_000
        seconds = time.process_time() - started
    finally:
        sys.setrecursionlimit(limit)
    # CPU time of this process, not wall time, so a loaded machine cannot fail it; a quadratic
    # measure over 90k containers would take minutes, the linear one takes ~0.1 s.
    assert seconds < 2


# ---- JSON bodies: the REST API and the OpenAI API ------------------------------------------

API_BODIES = ["/api/runs/", "/api/datasets/", "/api/tokenizers/"]


def _post(client, path: str, body: str):
    started = time.process_time()
    response = client.post(path, body, content_type="application/json")
    return response, time.process_time() - started


@pytest.mark.django_db
@pytest.mark.parametrize("body", [DEEP_100K, DEEP_1M], ids=["depth-100k", "depth-1M"])
def test_deep_json_is_a_400_in_under_a_second_even_anonymously(body):
    response, seconds = _post(APIClient(), "/api/auth/token/", body)
    assert response.status_code == 400, response.content
    assert response.json() == {"detail": DEPTH_MESSAGE}
    assert seconds < 1


@pytest.mark.django_db
@pytest.mark.parametrize("path", API_BODIES)
@pytest.mark.parametrize("body", [DEEP_100K, DEEP_1M], ids=["depth-100k", "depth-1M"])
def test_deep_json_is_a_400_in_under_a_second_on_every_write(signed_in, path, body):
    response, seconds = _post(signed_in, path, body)
    assert response.status_code == 400, response.content
    assert response.json() == {"detail": DEPTH_MESSAGE}
    assert seconds < 1


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/auth/token/", *API_BODIES])
def test_a_body_over_the_limit_is_a_400_that_says_so(signed_in, path):
    response, _ = _post(signed_in, path, TOO_BIG_BODY)
    assert response.status_code == 400, response.content
    assert response.json() == {"detail": "the body is larger than 1048576 bytes"}


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/api/runs/", {"kind": "base", "config": DEEP_100K}, "config"),
        ("/api/datasets/", {"name": "d", "source": "builtin", "options": DEEP_100K}, "options"),
        ("/api/tokenizers/", {"name": "t", "config": DEEP_100K}, "config"),
    ],
)
def test_deep_json_inside_a_form_field_is_a_400_naming_the_field(signed_in, path, body, field):
    started = time.process_time()
    response = signed_in.post(path, body, format="multipart")
    assert response.status_code == 400, response.content
    assert field in response.json() and time.process_time() - started < 1


@pytest.mark.django_db
def test_the_openai_api_answers_deep_and_big_bodies_in_its_own_error_shape(bearer):
    for body in (DEEP_100K, DEEP_1M):
        response, seconds = _post(bearer, "/v1/chat/completions", body)
        assert response.status_code == 400 and seconds < 1
        error = response.json()["error"]
        assert error["message"] == DEPTH_MESSAGE and error["type"] == "invalid_request_error"
    response, _ = _post(bearer, "/v1/chat/completions", TOO_BIG_BODY)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the body is larger than 1048576 bytes"


# ---- websockets ------------------------------------------------------------------------------


async def _answers(communicator, frames: list[str]) -> list[dict]:
    answers = []
    for frame in frames:
        await communicator.send_to(text_data=frame)
        answers.append(await communicator.receive_json_from(timeout=10))
    return answers


@pytest.mark.django_db(transaction=True)
def test_chat_socket_answers_bad_frames_with_error_frames_and_stays_open(
    alice, redis_url, settings
):
    settings.API_MAX_BODY_BYTES = 64 * 1024  # under daphne's own 1 MiB, so the consumer decides
    deep = "[" * 10_000 + "]" * 10_000  # deep enough for RecursionError, under 64 KiB
    frames = [deep, "[" * 65 + "]" * 65, "{not json", json.dumps(["x" * 70_000])]

    async def body():
        communicator = await open_socket(alice)
        answers = await _answers(communicator, [*frames, json.dumps({"type": "dance"})])
        await communicator.disconnect()
        return answers

    *errors, still_open = run(body)
    assert [e["type"] for e in errors] == ["error"] * 4
    assert [e["field"] for e in errors] == [None] * 4
    assert errors[0]["message"] == errors[1]["message"] == DEPTH_MESSAGE
    assert errors[2]["message"].startswith("the frame is not valid JSON")
    assert errors[3]["message"] == "the frame is larger than 65536 bytes"
    # The following valid frame is read and validated like any other.
    assert still_open["type"] == "error" and still_open["field"] == "type"


@pytest.mark.django_db(transaction=True)
def test_runs_socket_answers_anything_but_a_ping_with_an_error_frame_and_stays_open(
    alice, redis_url
):
    frames = ["not json", DEEP_100K, json.dumps({"type": "subscribe"})]

    async def body():
        communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/runs/")
        communicator.scope["user"] = alice
        connected, _ = await communicator.connect()
        assert connected
        answers = await _answers(communicator, [*frames, json.dumps({"type": "ping"})])
        await communicator.disconnect()
        return answers

    *errors, pong = run(body)
    assert [e["type"] for e in errors] == ["error"] * 3
    assert errors[0]["message"].startswith("the frame is not valid JSON")
    assert errors[1]["message"] == DEPTH_MESSAGE
    assert "ping" in errors[2]["message"]
    assert pong == {"type": "pong"}


@pytest.mark.services
@pytest.mark.timeout(120)
def test_the_web_server_closes_a_socket_sending_over_1_mib_with_a_reason(tmp_path):
    """daphne (autobahn) used to drop the TCP connection: no close frame, no reason."""
    port = free_port()
    argv = [sys.executable, "-m", "nanochat_site.webserver", "-b", "127.0.0.1", "-p", str(port),
            "tests.site.ws_echo:application"]  # fmt: skip
    log = (tmp_path / "web.log").open("w")
    server = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, server)
        with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/ws/") as client:
            client.send("x" * 1024 * 1024)  # exactly the limit: delivered
            assert client.recv(timeout=30) == str(1024 * 1024)
            client.send("x" * (1024 * 1024 + 1))
            with pytest.raises(ConnectionClosedError) as closed:
                client.recv(timeout=30)
        assert closed.value.rcvd is not None, "no close frame: the connection was dropped"
        assert closed.value.rcvd.code == 1009  # message too big
        assert "exceeds payload limit of 1048576" in closed.value.rcvd.reason
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


@pytest.mark.services
@pytest.mark.timeout(120)
def test_the_web_server_refuses_a_body_over_the_cap_while_it_arrives(tmp_path):
    """daphne spooled any body to disk before Django could refuse it; now the server stops it."""
    port = free_port()
    argv = [sys.executable, "-m", "nanochat_site.webserver", "-b", "127.0.0.1", "-p", str(port),
            "tests.site.ws_echo:application"]  # fmt: skip
    # Cap = max(API_MAX_BODY_BYTES, UPLOAD_MAX_BYTES) + 1 MiB of multipart framing = 2 MiB.
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "API_MAX_BODY_BYTES": "1024", "UPLOAD_MAX_BYTES": str(1024 * 1024)}  # fmt: skip
    cap = 2 * 1024 * 1024
    log = (tmp_path / "web.log").open("w")
    server = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, server)
        url = f"http://127.0.0.1:{port}/upload"
        assert requests.post(url, data=b"x" * cap, timeout=30).text == str(cap)
        # A declared length over the cap: 413 before the client sends one byte of the body.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n"
                         .encode())  # fmt: skip
            answer = conn.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 413 ") and f"larger than {cap} bytes" in answer

        # No length declared (chunked): cut off once it passes the cap, not spooled to the end.
        def chunks():
            for _ in range(64):  # 64 MiB offered
                yield b"x" * (1024 * 1024)

        try:
            status = requests.post(url, data=chunks(), timeout=30).status_code
        except requests.exceptions.ConnectionError:
            status = None  # cut off mid-body
        assert status in (None, 413)
        assert server.poll() is None
        assert requests.post(url, data=b"small", timeout=30).text == "5"
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def _wait_for_port(port: int, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "the web server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


# ---- query strings ----------------------------------------------------------------------------


@pytest.fixture
def a_run(alice):
    return Run.objects.create(kind=Kind.BASE, name="visible-run", owner=alice)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path, field",
    [
        ("/runs/?search=%00", "search"),
        ("/runs/?owner=%00", "owner"),
        ("/runs/?kind=%00&status=%00", "kind"),
        ("/checkpoints/?stage=%00", "stage"),
        ("/runs/compare/?ids=%C2%B2", "ids"),  # "²" passes str.isdigit(), int() refuses it
        ("/runs/compare/?ids=99999999999", "ids"),
        ("/chat/?checkpoint=%C2%B2", "checkpoint"),
        ("/chat/?checkpoint=" + "9" * 5000, "checkpoint"),
    ],
)
def test_pages_ignore_a_filter_no_database_can_take_and_say_so(signed_in, a_run, path, field):
    response = signed_in.get(path)
    assert response.status_code == 200
    assert f"Ignored the {field} " in response.content.decode()


@pytest.mark.django_db
def test_the_runs_page_lists_everything_when_its_only_filter_is_ignored(signed_in, a_run):
    response = signed_in.get("/runs/?search=%00")
    assert response.status_code == 200 and "visible-run" in response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path, field",
    [
        ("/api/runs/?search=%00", "search"),
        ("/api/runs/?owner=%00", "owner"),
        ("/api/runs/?kind=%00", "kind"),
        ("/api/checkpoints/?stage=%00", "stage"),
        ("/api/evals/?task=%00", "task"),
        ("/api/runs/{run}/events/?type=%00", "type"),
        ("/api/runs/{run}/metrics/?names=%00", "names"),
        ("/api/runs/{run}/metrics/?after_step=2147483648", "after_step"),
        ("/api/runs/{run}/metrics/?after_step=-2147483649", "after_step"),
        ("/api/runs/{run}/events/?after=2147483648", "after"),
        ("/api/checkpoints/?run=2147483648", "run"),
        ("/api/evals/?checkpoint=9223372036854775808", "checkpoint"),
        ("/api/reports/?run=-9223372036854775809", "run"),
    ],
)
def test_api_query_values_no_database_can_take_are_400s_naming_them(signed_in, a_run, path, field):
    response = signed_in.get(path.format(run=a_run.pk))
    assert response.status_code == 400, response.content
    assert list(response.json()) == [field]


@pytest.mark.django_db
def test_after_step_at_the_top_of_the_range_still_works(signed_in, a_run):
    MetricPoint.objects.create(run=a_run, name="train/loss", step=5, value=1.0, time=0.0)
    url = f"/api/runs/{a_run.pk}/metrics/?names=train/loss&after_step="
    assert signed_in.get(url + "2147483647").json()["series"]["train/loss"]["total"] == 0
    assert signed_in.get(url + "-2147483648").json()["series"]["train/loss"]["total"] == 1


# ---- uploads ---------------------------------------------------------------------------------


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _uploads(*sizes: int) -> list[SimpleUploadedFile]:
    return [SimpleUploadedFile(f"part{i}.txt", b"x" * size) for i, size in enumerate(sizes)]


@pytest.mark.django_db
def test_uploads_over_the_limit_are_a_400_naming_files_and_leave_nothing(signed_in, settings):
    settings.UPLOAD_MAX_BYTES = 1000
    home = Path(settings.NANOCHAT_HOME)
    before = _files_under(home)
    body = {"name": "big", "source": "upload", "files": _uploads(600, 600)}
    response = signed_in.post("/api/datasets/", body, format="multipart")
    assert response.status_code == 400, response.content
    assert list(response.json()) == ["files"] and "1000" in response.json()["files"][0]
    assert not Dataset.objects.exists() and not Run.objects.exists()
    assert not _files_under(home) - before
    # Under the limit the same request is accepted.
    body = {"name": "small", "source": "upload", "files": _uploads(500, 500)}
    assert signed_in.post("/api/datasets/", body, format="multipart").status_code == 201


@pytest.mark.django_db
def test_the_datasets_page_refuses_uploads_over_the_limit_next_to_the_field(signed_in, settings):
    settings.UPLOAD_MAX_BYTES = 1000
    before = _files_under(Path(settings.NANOCHAT_HOME))
    body = {"name": "big", "source": "upload", "files": _uploads(1001)}
    response = signed_in.post("/datasets/", body)
    assert response.status_code == 400
    assert "at most 1000 in all" in response.content.decode()
    assert not Dataset.objects.exists()
    assert not _files_under(Path(settings.NANOCHAT_HOME)) - before


@pytest.mark.django_db
def test_the_copy_to_disk_counts_bytes_and_removes_partial_files(alice, settings):
    """A caller that skips the size check (or a size that lies) is stopped while writing."""
    settings.UPLOAD_MAX_BYTES = 1000
    before = _files_under(Path(settings.NANOCHAT_HOME))
    first, second = _uploads(600, 600)
    second.size = 1  # what a caller claims; the copy counts the bytes themselves
    with pytest.raises(ConfigError) as refused:
        services.create_dataset(alice, "lying", "upload", {}, uploads=[first, second])
    assert list(refused.value.errors) == ["files"]
    assert not _files_under(Path(settings.NANOCHAT_HOME)) - before
    assert not Dataset.objects.exists()
