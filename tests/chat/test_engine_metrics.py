"""/metrics follows a real chat reply: streamed through the site's websocket by a real engine
worker process, it adds one observation to the worker's time-to-first-token and decode-speed
histograms, and its tokens and request to the worker's counters."""

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.chat.conftest import frames_until, open_socket, run

pytestmark = pytest.mark.django_db(transaction=True)

TTFT = "nanochat_engine_time_to_first_token_seconds"
SPEED = "nanochat_engine_decode_tokens_per_second"


def worker_samples(client, worker: str) -> dict[tuple[str, str | None], float]:
    """One scrape's samples of `worker`, keyed by (sample name, le)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
        if sample.labels.get("worker") == worker
    }


def buckets(samples, name: str) -> list[float]:
    return [value for (sample, _), value in samples.items() if sample == f"{name}_bucket"]


def test_a_streamed_reply_is_counted_in_the_engine_histograms(client, alice, checkpoint, engine):
    worker = engine.stats()["worker"]
    before = worker_samples(client, worker)
    assert before[(f"{TTFT}_bucket", "+Inf")] == before[(f"{TTFT}_count", None)]

    async def body():
        socket = await open_socket(alice)
        await socket.send_json_to(
            {"type": "send", "conversation": None, "checkpoint": checkpoint.pk,
             "content": "Hello!", "max_tokens": 12}
        )  # fmt: skip
        frames = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return frames

    done = run(body)[-1]
    assert done["type"] == "done", done
    assert done["completion_tokens"] == 12

    # The worker publishes its stats once a second: wait for the tick that carries the reply.
    deadline = time.monotonic() + 15
    while True:
        after = worker_samples(client, worker)
        if after[(f"{TTFT}_count", None)] > before[(f"{TTFT}_count", None)]:
            break
        assert time.monotonic() < deadline, "the reply never reached /metrics"
        time.sleep(0.3)

    for name in (TTFT, SPEED):
        assert after[(f"{name}_count", None)] == before[(f"{name}_count", None)] + 1, name
        assert after[(f"{name}_sum", None)] > before[(f"{name}_sum", None)], name
        assert after[(f"{name}_bucket", "+Inf")] == after[(f"{name}_count", None)], name
        counts = buckets(after, name)
        assert counts == sorted(counts) and len(counts) > 2, name  # cumulative
    # The reply's own timings are the ones observed: its wait lies in the bucket that grew.
    waited = after[(f"{TTFT}_sum", None)] - before[(f"{TTFT}_sum", None)]
    assert waited == pytest.approx(done["time_to_first_token"], abs=1e-3)
    grew = [
        float(le)
        for (sample, le), value in after.items()
        if sample == f"{TTFT}_bucket" and value > before[(sample, le)]
    ]
    assert grew and min(grew) >= waited
    assert after[("nanochat_engine_tokens_generated_total", None)] == (
        before[("nanochat_engine_tokens_generated_total", None)] + 12
    )
    assert after[("nanochat_engine_requests_served_total", None)] == (
        before[("nanochat_engine_requests_served_total", None)] + 1
    )
