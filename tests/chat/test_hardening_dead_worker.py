"""Issue 13, reproduction 7: a reply whose engine worker dies is told so within seconds.

A real engine worker process is SIGKILLed in the middle of a long reply (the tiny checkpoint
never stops before max_tokens): the chat websocket answers with an error frame and the
OpenAI API stream with an error event, both within 5 s, because the reply watches the worker's
liveness key (chat/stats.py) instead of waiting out CHAT_ENGINE_IDLE_TIMEOUT. A request sent
while no worker runs stays queued in Redis and is served by the worker that starts later (what
`manage.py up` does when it restarts a dead one).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import openai
import pytest
from rest_framework.authtoken.models import Token

from chat.models import Conversation
from chat.protocol import WORKER_DIED, Chunk, Final, Reply
from tests.chat.conftest import EngineWorkerProcess, frames_until, open_socket, run
from tests.chat.test_engine_worker import request
from tests.chat.test_openai_api import DaphneServer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(300)]

TOLD_WITHIN = 5.0


@pytest.fixture
def doomed_worker(redis_url, tmp_path, settings):
    """An engine worker of this test alone (it will be killed), the site pointed at it."""
    worker = EngineWorkerProcess(f"engine-doomed-{uuid.uuid4().hex[:8]}", tmp_path / "w.log")
    settings.CHAT_ENGINE_CHANNEL = worker.channel
    try:
        yield worker
    finally:
        worker.stop()


def kill(worker: EngineWorkerProcess) -> float:
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=10)
    return time.monotonic()


def test_a_websocket_client_gets_an_error_frame_when_its_worker_is_killed(
    alice, checkpoint, doomed_worker
):
    async def body():
        socket = await open_socket(alice)
        await socket.send_json_to(
            {"type": "send", "checkpoint": checkpoint.pk, "content": "Tell me a long story.",
             "max_tokens": 4096}
        )  # fmt: skip
        await frames_until(socket, "token", "error")
        killed_at = kill(doomed_worker)
        frames = await frames_until(socket, "done", "error", timeout=30)
        told_after = time.monotonic() - killed_at
        # The socket stays open and usable: a new frame is answered.
        await socket.send_json_to({"type": "stop"})
        await socket.send_json_to({"type": "nonsense"})
        after = await frames_until(socket, "error", timeout=10)
        await socket.disconnect()
        return frames[-1], told_after, after[-1]

    last, told_after, after = run(body)
    assert last == {"type": "error", "field": None, "message": WORKER_DIED}
    assert told_after < TOLD_WITHIN, f"told after {told_after:.1f} s"
    assert after["field"] == "type"
    assert not Conversation.objects.exists()  # the unanswered message was taken back


def test_an_sse_stream_gets_an_error_event_when_its_worker_is_killed(
    alice, checkpoint, doomed_worker, tmp_path
):
    daphne = DaphneServer(tmp_path / "daphne.log", CHAT_ENGINE_CHANNEL=doomed_worker.channel)
    try:
        token = Token.objects.create(user=alice)
        client = openai.OpenAI(base_url=f"{daphne.url}/v1", api_key=token.key, max_retries=0,
                               timeout=60)  # fmt: skip
        stream = client.chat.completions.create(
            model=f"ckpt-{checkpoint.pk}",
            messages=[{"role": "user", "content": "Tell me a long story."}],
            max_tokens=4096,
            stream=True,
        )
        killed_at = None
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                if killed_at is None and chunk.choices and chunk.choices[0].delta.content:
                    killed_at = kill(doomed_worker)
        told_after = time.monotonic() - killed_at
        assert WORKER_DIED in str(caught.value)
        assert told_after < TOLD_WITHIN, f"told after {told_after:.1f} s"
    finally:
        daphne.stop()


def test_a_request_sent_while_no_worker_runs_is_served_once_one_starts(
    tiny_checkpoint_dir, redis_url, tmp_path
):
    channel = f"engine-late-{uuid.uuid4().hex[:8]}"
    workers = []

    async def body():
        reply = Reply(request(tiny_checkpoint_dir, max_tokens=5), engine_channel=channel,
                      accept_timeout=120)  # fmt: skip
        async with reply:
            await asyncio.sleep(0)  # the request is in Redis now; nobody listens on `channel`
            workers.append(EngineWorkerProcess(channel, tmp_path / "late.log", wait=False))
            return [event async for event in reply]

    try:
        *chunks, final = run(body)
    finally:
        for worker in workers:
            worker.stop()
    assert all(isinstance(c, Chunk) for c in chunks) and isinstance(final, Final)
    assert final.completion_tokens == 5 and final.finish_reason == "length"
