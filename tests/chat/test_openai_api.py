"""The OpenAI-compatible API, used through the official `openai` client against a real server.

The server is daphne (ASGI, as in production) in its own process, on the test database and the
test Redis, sending generation requests to the engine worker of tests/chat/conftest.py. What
never reaches the engine (session auth, CSRF, malformed bodies) is checked in-process.
"""

from __future__ import annotations

import re
import sys
import time
import uuid
from pathlib import Path

import openai
import pytest
from django.test import Client
from rest_framework.authtoken.models import Token

from nanochat_site.proctree import LoggedProcess
from tests.runs.live_workers import worker_env

pytestmark = pytest.mark.django_db(transaction=True)

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(rb"Listening on TCP address 127\.0\.0\.1:(\d+)")


class DaphneServer(LoggedProcess):
    """`daphne nanochat_site.asgi:application` on a free port, as a process group of its own."""

    def __init__(self, log_path: Path, **env: str) -> None:
        argv = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", "0",
                "nanochat_site.asgi:application"]  # fmt: skip
        super().__init__(argv, log_path, env=worker_env(**env), cwd=REPO)
        match = self.wait_for(lambda: LISTENING.search(log_path.read_bytes()), "daphne", 60)
        self.url = f"http://127.0.0.1:{int(match[1])}"


@pytest.fixture(scope="module")
def server(django_db_setup, engine_worker, tmp_path_factory):
    daphne = DaphneServer(
        tmp_path_factory.mktemp("daphne") / "daphne.log",
        CHAT_ENGINE_CHANNEL=engine_worker.channel,
    )
    try:
        yield daphne
    finally:
        daphne.stop()


@pytest.fixture
def token(alice) -> Token:
    return Token.objects.create(user=alice)


@pytest.fixture
def client(server, token) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=token.key, max_retries=0, timeout=60)


def test_models_lists_the_checkpoints(client, checkpoint):
    from runs.models import Checkpoint

    base = Checkpoint.objects.create(stage="base", step=9, path="/elsewhere/d2")
    listed = [m for m in client.models.list().data if m.id.startswith("ckpt-")]
    # Chat-tuned checkpoints first (then the aliases: tests/chat/test_openai_compat.py).
    assert [m.id for m in listed] == [f"ckpt-{checkpoint.pk}", f"ckpt-{base.pk}"]
    assert {m.object for m in listed} == {"model"} and {m.owned_by for m in listed} == {"nanochat"}
    assert listed[0].created == int(checkpoint.created.timestamp())
    assert client.models.retrieve(f"ckpt-{base.pk}").id == f"ckpt-{base.pk}"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ckpt-999999")


def test_a_reply_comes_whole_with_usage(client, checkpoint, engine):
    reply = client.chat.completions.create(
        model=f"ckpt-{checkpoint.pk}",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello! How are you?"},
        ],
        max_tokens=20,
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == f"ckpt-{checkpoint.pk}"
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content
    # The tiny model never picks its end token: every reply runs to max_tokens.
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 20
    # The system text is part of the prompt (folded into the user message).
    plain = client.chat.completions.create(
        model=f"ckpt-{checkpoint.pk}",
        messages=[{"role": "user", "content": "Hello! How are you?"}],
        max_tokens=1,
    )
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 20


def test_run_model_follows_the_runs_newest_checkpoint(client, followed_run, engine):
    model = f"run-{followed_run.run.pk}"
    first = followed_run.run.checkpoints.get()
    listed = {m.id: m for m in client.models.list().data}
    assert listed[model].alias_of == f"ckpt-{first.pk}" and listed[model].step == first.step
    ask = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert client.chat.completions.create(**ask).model == f"ckpt-{first.pk}"
    newer = followed_run.save(first.step + 10)
    # The response names the checkpoint that answered; its model entry gives the step.
    assert client.chat.completions.create(**ask).model == f"ckpt-{newer.pk}"
    assert client.models.retrieve(f"ckpt-{newer.pk}").step == first.step + 10


def test_a_streamed_reply_is_the_same_text_in_pieces(client, checkpoint, engine):
    ask = {
        "model": "latest-sft",  # an alias of the newest SFT checkpoint
        "messages": [{"role": "user", "content": "What is 12*34?"}],
        "max_completion_tokens": 40,
        "seed": 1234,
        "extra_body": {"top_k": 20},  # nanochat's extension
    }
    whole = client.chat.completions.create(**ask)
    chunks = list(
        client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == f"ckpt-{checkpoint.pk}"
    *with_choices, usage = chunks
    assert with_choices[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in with_choices[1:-1]]
    assert len(texts) >= 2 and all(texts)
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert not usage.choices and usage.usage.completion_tokens == 40
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    # Same seed, same sampling: the stream adds up to the whole reply.
    assert "".join(texts) == whole.choices[0].message.content


def test_closing_a_stream_stops_the_generation(client, checkpoint, engine):
    served = idle_stats(engine, time.time())["tokens_served"]
    stream = client.chat.completions.create(
        model=f"ckpt-{checkpoint.pk}",
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=4096,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    stream.close()
    # The reply ends (stopped) well short of its 4096 tokens.
    assert idle_stats(engine, time.time())["tokens_served"] - served < 4096


def idle_stats(engine, since: float) -> dict:
    """The worker's stats once it has no reply in progress, as published after `since`."""

    def idle():
        stats = engine.stats()
        return stats if stats["updated"] > since and stats["in_flight"] == 0 else None

    return engine.wait_until(idle, 60, "the engine worker to be idle")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 5000}, "max_completion_tokens"),
        ({"top_k": -1}, "top_k"),
        (
            {"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]},
            "messages[0].role",
        ),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
        ({"n": 0}, "n"),
        ({"top_p": 0.5}, "top_p"),
        ({"stop": 3}, "stop"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters_are_a_400_naming_the_param(client, checkpoint, change, param):
    ask = {"model": f"ckpt-{checkpoint.pk}", "messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(openai.BadRequestError) as caught:
        extension = {"extra_body": change} if "top_k" in change else change
        client.chat.completions.create(**{**ask, **extension})
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error" and caught.value.message


def test_a_system_message_error_names_the_message_as_sent(client, checkpoint):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Hi again"},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=f"ckpt-{checkpoint.pk}", messages=messages)
    assert caught.value.param == "messages[2].role"
    assert "messages[2].role" in caught.value.message


def test_a_conversation_longer_than_the_model_reads_is_a_400(client, checkpoint, engine):
    # Within the character limits (5 x 6000 of 32000), beyond the tiny model's 4352 tokens.
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 136)[:6000]
    roles = ["user", "assistant", "user", "assistant", "user"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=f"ckpt-{checkpoint.pk}",
            messages=[{"role": role, "content": text} for role in roles],
            max_tokens=4,
        )
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
    assert "tokens long" in caught.value.message


def test_a_bad_token_is_a_401(server, checkpoint):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model=f"ckpt-{checkpoint.pk}", messages=[{"role": "user", "content": "Hi"}]
        )


def test_an_unknown_model_is_a_404(client, checkpoint):
    for name in ("ckpt-999999", "gpt-4o", "latest-rl"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}])
        assert caught.value.status_code == 404
        assert caught.value.code == "model_not_found" and caught.value.param == "model"


def test_no_engine_worker_is_a_503(redis_url, checkpoint, token, tmp_path):
    nobody = DaphneServer(
        tmp_path / "daphne.log",
        CHAT_ENGINE_CHANNEL=f"engine-nobody-{uuid.uuid4().hex[:8]}",
        CHAT_ENGINE_ACCEPT_TIMEOUT="0.5",
    )
    try:
        client = openai.OpenAI(base_url=f"{nobody.url}/v1", api_key=token.key, max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as caught:
                client.chat.completions.create(
                    model=f"ckpt-{checkpoint.pk}",
                    messages=[{"role": "user", "content": "Hi"}],
                    stream=stream,
                )
            assert caught.value.status_code == 503
            assert caught.value.code == "engine_unavailable"
            assert "no engine worker" in caught.value.message
    finally:
        nobody.stop()


# ---- in-process: no engine needed ---------------------------------------------------------


def test_a_session_works_and_a_session_post_needs_the_csrf_token(alice, checkpoint):
    browser = Client(enforce_csrf_checks=True)
    assert browser.get("/v1/models").status_code == 401
    browser.force_login(alice)
    listed = browser.get("/v1/models")
    assert listed.status_code == 200
    ids = [m["id"] for m in listed.json()["data"]]
    assert ids == [f"ckpt-{checkpoint.pk}", "latest", "latest-sft"]
    response = browser.post(
        "/v1/chat/completions", {"model": "nope"}, content_type="application/json"
    )
    assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed"
    # With the CSRF token (the login page sets its cookie) it gets as far as the model lookup.
    browser.get("/login/")
    response = browser.post(
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "Hi"}]},
        content_type="application/json",
        headers={"X-CSRFToken": browser.cookies["csrftoken"].value},
    )
    assert response.status_code == 404


def test_malformed_requests_are_400s_not_500s(alice, token):
    api = Client(headers={"Authorization": f"Bearer {token.key}"})
    not_json = api.post("/v1/chat/completions", "{", content_type="application/json")
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    a_list = api.post("/v1/chat/completions", [1], content_type="application/json")
    assert a_list.status_code == 400
    no_model = api.post("/v1/chat/completions", {"messages": []}, content_type="application/json")
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    assert api.get("/v1/chat/completions").status_code == 405
