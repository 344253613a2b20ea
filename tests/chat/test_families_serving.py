"""The GPT-2 and hybrid families through the web app, end to end with real processes.

A `pipeline` run submitted through the API with `model: gpt2` / `model: hybrid` (tiny preset,
shortened stages) runs under a real Celery worker; its SFT checkpoint, a row like any GPT's,
then answers over `/ws/chat/` (the engine worker of tests/chat/conftest.py) and over
`/v1/chat/completions` (daphne, with the official `openai` client).
"""

from __future__ import annotations

import openai
import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from runs.models import Checkpoint, Run, Status
from tests.chat.conftest import frames_until, open_socket, run
from tests.chat.test_openai_api import DaphneServer
from tests.runs.live_workers import LiveWorker, wait_for

pytestmark = [pytest.mark.services, pytest.mark.timeout(600),
              pytest.mark.django_db(transaction=True)]  # fmt: skip

# The tiny pipeline, each stage cut to seconds: what is checked is that every stage of the
# family runs and its SFT model serves, not what it learns. GPT-2 trains with its own recipe
# (AdamW), as its presets do.
SHORT = {
    "base_chat_eval_tasks": "",
    "base_args": "--max-seq-len 128 --device-batch-size 2 --num-iterations 10 --eval-every -1 "
    "--sample-every -1",
    "base_eval_args": "--max-per-task 2 --eval-tokens 512 --sample-tokens 4",
    "sft_args": "--max-seq-len 128 --device-batch-size 4 --num-iterations 10 --eval-every -1 "
    "--mixture spelling_bee,simple_spelling,identity",
    "chat_eval_args": "--tasks spelling_bee,arc_easy --max-new-tokens 8 --max-problems 2",
}
RECIPE = {"gpt2": " --optimizer adamw --adamw-lr 3e-3", "hybrid": ""}
STAGES = ["dataset", "tokenizer", "base", "base_eval", "sft", "chat_eval_sft"]


@pytest.fixture(scope="module")
def training_worker(redis_url, tmp_path_factory, django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        worker = LiveWorker("training", tmp_path_factory.mktemp("workers"))
    yield worker
    worker.stop()


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


def run_pipeline(alice, family: str, worker) -> Checkpoint:
    """Submit the pipeline through the API, wait for it, return its SFT checkpoint row."""
    api = APIClient()
    api.force_authenticate(alice)
    config = {**SHORT, "model": family}
    for key in ("base_args", "sft_args"):
        config[key] += RECIPE[family]
    response = api.post("/api/runs/", {"kind": "pipeline", "preset": "tiny", "config": config},
                        format="json")  # fmt: skip
    assert response.status_code == 201, response.content
    run_id = response.json()["id"]

    def info() -> str:
        pipeline = Run.objects.get(pk=run_id)
        children = "\n".join(f"{c.config.get('pipeline_stage')}: {c.status} {c.error!r}"
                             for c in pipeline.stage_runs.order_by("id"))  # fmt: skip
        return (f"{pipeline.status} error={pipeline.error!r}\n{children}\n{pipeline.log_tail}"
                f"\n--- worker ---\n{worker.log()}")  # fmt: skip

    pipeline = wait_for(
        lambda: Run.objects.filter(pk=run_id, status__in=[Status.SUCCEEDED, Status.FAILED]).first(),
        420, f"the {family} pipeline to end", interval=1, info=info,
    )  # fmt: skip
    assert pipeline.status == Status.SUCCEEDED, info()
    stages = {child.config["pipeline_stage"]: child for child in pipeline.stage_runs.order_by("id")}
    assert list(stages) == STAGES and all(c.status == Status.SUCCEEDED for c in stages.values())
    base = Checkpoint.objects.get(run=stages["base"])
    sft = Checkpoint.objects.get(run=stages["sft"])
    assert base.model_config["model"] == sft.model_config["model"] == family
    assert sft.stage == "sft" and stages["sft"].parent_checkpoint == base
    assert stages["chat_eval_sft"].eval_results.filter(checkpoint=sft).count() >= 2
    assert pipeline.reports.filter(section="Report").exists()
    return sft


@pytest.mark.parametrize("family", ["gpt2", "hybrid"])
def test_a_family_pipeline_from_the_api_trains_a_model_that_answers(
    family, alice, training_worker, engine, server
):
    checkpoint = run_pipeline(alice, family, training_worker)

    async def chat():
        socket = await open_socket(alice)
        await socket.send_json_to({"type": "send", "conversation": None,
                                   "checkpoint": checkpoint.pk, "content": "Hello!",
                                   "max_tokens": 8})  # fmt: skip
        frames = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return frames

    frames = run(chat)
    started, *tokens, done = frames
    assert started["type"] == "started" and done["type"] == "done", done
    assert done["finish_reason"] in ("stop", "length") and 1 <= done["completion_tokens"] <= 8
    assert "".join(t["text"] for t in tokens if t["type"] == "token") == done["content"]

    client = openai.OpenAI(base_url=f"{server.url}/v1", max_retries=0, timeout=120,
                           api_key=Token.objects.create(user=alice).key)  # fmt: skip
    reply = client.chat.completions.create(
        model=f"ckpt-{checkpoint.pk}",
        messages=[{"role": "user", "content": "Spell the word 'cat'."}],
        max_tokens=8,
    )
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 5
