"""The engine worker process seen through chat/protocol.py: errors come back as errors, a
missing worker is noticed, and SIGTERM ends every reply in progress with a message."""

import signal
import uuid

import pytest
from channels.layers import get_channel_layer

from chat.models import Conversation
from chat.protocol import Chunk, EngineError, Final, GenerationRequest, Reply
from chat.stats import read_stats
from tests.chat.conftest import STEP, EngineWorkerProcess, frames_until, open_socket, run


def request(path, content="Hello!", max_tokens=5, **fields) -> GenerationRequest:
    return GenerationRequest(
        checkpoint_path=str(path), step=STEP, messages=[{"role": "user", "content": content}],
        temperature=0.8, top_k=50, max_tokens=max_tokens, seed=1, **fields,
    )  # fmt: skip


async def collect(reply: Reply) -> list:
    events = []
    async with reply:
        async for event in reply:
            events.append(event)
    return events


def test_a_request_reaches_the_worker_and_a_reply_comes_back(tiny_checkpoint_dir, engine):
    async def body():
        return await collect(Reply(request(tiny_checkpoint_dir)))

    events = run(body)
    *chunks, final = events
    assert all(isinstance(c, Chunk) for c in chunks) and isinstance(final, Final)
    assert final.completion_tokens == 5 and final.finish_reason == "length"
    assert "".join(c.text for c in chunks) == final.content


def test_a_prompt_longer_than_the_model_reads_is_an_error(tiny_checkpoint_dir, engine):
    too_long = request(tiny_checkpoint_dir, content="~" * 8000)

    async def body():
        return await collect(Reply(too_long))

    with pytest.raises(EngineError, match="tokens long and this model reads at most 4352"):
        run(body)


def test_a_malformed_request_is_answered_with_an_error(engine):
    async def body():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.send(
            engine.channel,
            {"type": "engine.generate", "reply": channel, "id": "r1", "max_tokens": 0},
        )
        return await layer.receive(channel)

    answer = run(body)
    assert answer["type"] == "engine.error" and answer["request"] == "r1"
    assert "malformed request" in answer["message"]


@pytest.mark.django_db(transaction=True)
def test_without_a_worker_the_send_fails_and_leaves_nothing(alice, checkpoint, redis_url, settings):
    settings.CHAT_ENGINE_CHANNEL = f"nobody-listens-{uuid.uuid4().hex[:8]}"
    settings.CHAT_ENGINE_ACCEPT_TIMEOUT = 1

    async def body():
        socket = await open_socket(alice)
        await socket.send_json_to({"type": "send", "checkpoint": checkpoint.pk, "content": "hi"})
        frames = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return frames

    frames = run(body)
    assert frames[-1]["type"] == "error" and frames[-1]["field"] is None
    assert "no engine worker took the request" in frames[-1]["message"]
    assert not Conversation.objects.exists()


def test_sigterm_ends_replies_in_progress_and_removes_the_worker(
    tiny_checkpoint_dir, redis_url, tmp_path
):
    worker = EngineWorkerProcess(f"engine-term-{uuid.uuid4().hex[:8]}", tmp_path / "worker.log")
    try:

        async def body():
            events = []
            reply = Reply(
                request(tiny_checkpoint_dir, max_tokens=4096), engine_channel=worker.channel
            )
            async with reply:
                try:
                    async for event in reply:
                        events.append(event)
                        if len(events) == 1:
                            worker.proc.send_signal(signal.SIGTERM)
                except EngineError as exc:
                    return events, str(exc)
            return events, None

        events, error = run(body)
        assert error == "the engine worker stopped"
        assert all(isinstance(e, Chunk) for e in events)
        assert worker.proc.wait(timeout=20) == 0
        assert worker.stats() is None  # its stats key is gone at once
    finally:
        worker.stop()


def test_workers_share_the_channel_and_a_full_one_leaves_requests_to_the_other(
    tiny_checkpoint_dir, redis_url, tmp_path
):
    channel = f"engine-pair-{uuid.uuid4().hex[:8]}"
    workers = [
        EngineWorkerProcess(channel, tmp_path / f"worker{i}.log", "--max-rows", "1", wait=False)
        for i in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_until(
                lambda w=worker: any(s["pid"] == w.proc.pid for s in read_stats(channel)),
                60,
                "the engine worker to start",
            )

        async def body():
            replies = [
                Reply(request(tiny_checkpoint_dir, max_tokens=4096), engine_channel=channel)
                for _ in range(2)
            ]
            served_by = []
            for reply in replies:
                await reply.__aenter__()
                async for event in reply:  # wait until it is being decoded
                    assert isinstance(event, Chunk)
                    break
                served_by.append(reply.worker)
            for reply in replies:
                await reply.stop()
                finals = [event async for event in reply if isinstance(event, Final)]
                assert finals[0].finish_reason == "stopped"
            return served_by

        served_by = run(body)
        # Each worker has one row: the one decoding the first reply left the second to the other.
        assert len(set(served_by)) == 2
        assert set(served_by) == {w["worker"] for w in read_stats(channel)}
    finally:
        for worker in workers:
            worker.stop()
