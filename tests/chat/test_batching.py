"""Continuous batching in the engine worker: replies join a running decode loop, and a model
that is still generating is never evicted to make room for another."""

import asyncio
import shutil

import pytest

from runs.models import Checkpoint
from tests.chat.conftest import STEP, frames_until, open_socket, run

pytestmark = pytest.mark.django_db(transaction=True)


def send(model, content: str, max_tokens: int) -> dict:
    return {"type": "send", "checkpoint": model.pk, "content": content, "max_tokens": max_tokens}


def test_a_second_reply_joins_the_running_batch(alice, bob, checkpoint, engine):
    served_before = engine.stats()["tokens_served"]

    async def body():
        first, second = await open_socket(alice), await open_socket(bob)
        await first.send_json_to(send(checkpoint, "Tell me a long story.", 4096))
        await frames_until(first, "token")  # the first reply is being decoded now
        await second.send_json_to(send(checkpoint, "And a short one?", 30))
        second_frames = await frames_until(second, "done", "error")
        await first.send_json_to({"type": "stop"})
        first_frames = await frames_until(first, "done", "error")
        await first.disconnect()
        await second.disconnect()
        return first_frames[-1], second_frames[-1]

    long_done, short_done = run(body)
    # The short reply ran start to end while the long one was decoding, in the same steps.
    assert short_done["type"] == "done" and short_done["completion_tokens"] == 30
    assert short_done["batch_rows"] == 2
    assert long_done["finish_reason"] == "stopped" and long_done["batch_rows"] == 2
    assert long_done["completion_tokens"] > 30
    # The worker publishes its stats every second, so an early snapshot can hold only part
    # of the count: wait for one that holds both replies.
    expected = served_before + 30 + long_done["completion_tokens"]
    stats = engine.wait_until(
        lambda: (s := engine.stats())["tokens_served"] >= expected and s, 15, "stats"
    )
    assert stats["capacity"] == 4 and stats["pid"] > 0
    assert [m["checkpoint"] for m in stats["models"]] == [checkpoint.path]


def test_a_busy_model_is_not_evicted_for_another(alice, bob, checkpoint, engine, tmp_path):
    # The worker keeps one model loaded; a copy of the checkpoint elsewhere is a second model.
    other_dir = tmp_path / "other"
    shutil.copytree(checkpoint.path, other_dir)
    other = Checkpoint.objects.create(stage="sft", step=STEP, path=str(other_dir))

    async def body():
        first, second = await open_socket(alice), await open_socket(bob)
        await first.send_json_to(send(checkpoint, "Tell me a long story.", 4096))
        await frames_until(first, "token")
        await second.send_json_to(send(other, "Hello?", 5))
        waiting = await frames_until(second, "started")
        # The second model cannot load while the first is busy: its request waits.
        queued = await asyncio.to_thread(
            engine.wait_until,
            lambda: (s := engine.stats())["queued"] == 1 and s,
            10,
            "a queued request",
        )
        await first.send_json_to({"type": "stop"})
        first_done = await frames_until(first, "done")
        second_frames = await frames_until(second, "done", "error")
        await first.disconnect()
        await second.disconnect()
        return waiting, queued, first_done[-1], second_frames[-1]

    waiting, queued, first_done, second_done = run(body)
    assert [m["checkpoint"] for m in queued["models"]] == [checkpoint.path]
    assert first_done["finish_reason"] == "stopped"
    assert second_done["type"] == "done" and second_done["completion_tokens"] == 5
    after = engine.wait_until(
        lambda: (s := engine.stats())["models"][0]["checkpoint"] == str(other_dir) and s,
        10, "the second model in the stats",
    )  # fmt: skip
    assert len(after["models"]) == 1
