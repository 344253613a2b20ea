"""A tiny chat model on disk and a real engine worker process serving it.

The worker is `manage.py engine_worker` in its own process, configured like a worker on
another machine (the product settings, pointed at the test Redis by REDIS_URL), on an engine
channel of its own so that nothing else sharing the Redis server can take its requests.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch
from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings

from chat.stats import read_stats
from engine.checkpoint import save_checkpoint, tokenizer_dir
from engine.models.gpt import GPT, GPTConfig
from engine.tokenizer import Tokenizer
from nanochat_site.proctree import LoggedProcess
from nanochat_site.routing import websocket_urlpatterns

REPO = Path(__file__).resolve().parents[2]
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "What is 12*34? It is 408. What is 2+3*4? It is 14.",
    "Hello! How are you today? I am fine, thank you.",
]
# Long enough for a 4096-token reply, so a stop or a second request always finds it running.
SEQUENCE_LEN = 4352
STEP = 5
# A demo-sized context: a few exchanges outgrow it.
SMALL_CONTEXT = 128


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS * 20, vocab_size=300)


def tiny_model(tokenizer: Tokenizer, sequence_len: int = SEQUENCE_LEN) -> tuple[GPT, GPTConfig]:
    """Random weights that never choose a special token: every reply runs to max_tokens.

    The special tokens' output rows are zero, so their logit is 0, while the other logits are
    spread wide (std ~16) around 0: with top-k 50 of ~290 ordinary tokens the cut-off is far
    above 0, so no special token (stop, tool call) is ever sampled.
    """
    config = GPTConfig(
        sequence_len=sequence_len,
        vocab_size=tokenizer.vocab_size,
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        n_embd=64,
    )
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
        model.lm_head.weight.normal_(0, 2.0)
        for name in tokenizer.special_tokens:
            model.lm_head.weight[tokenizer.encode_special(name)] = 0
    return model, config


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("chat") / "sft_checkpoints" / "d2"
    tokenizer = tiny_tokenizer()
    model, config = tiny_model(tokenizer)
    save_checkpoint(directory, STEP, model_state=model.state_dict(), model_config=config)
    tokenizer.save(tokenizer_dir(directory))
    return directory


@pytest.fixture(scope="session")
def small_checkpoint_dir(tmp_path_factory) -> Path:
    """The same tiny model with a context of SMALL_CONTEXT tokens, saved as a base checkpoint."""
    directory = tmp_path_factory.mktemp("chat-small") / "base_checkpoints" / "d2"
    tokenizer = tiny_tokenizer()
    model, config = tiny_model(tokenizer, SMALL_CONTEXT)
    save_checkpoint(directory, STEP, model_state=model.state_dict(), model_config=config)
    tokenizer.save(tokenizer_dir(directory))
    return directory


class EngineWorkerProcess(LoggedProcess):
    def __init__(self, channel: str, log_path: Path, *extra_args: str, wait: bool = True) -> None:
        self.channel = channel
        env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
        env.update(
            DJANGO_SETTINGS_MODULE="nanochat_site.settings",
            NANOCHAT_HOME=str(settings.NANOCHAT_HOME),
            REDIS_URL=settings.REDIS_URL,
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",  # a tiny model on a shared test machine
        )
        argv = [
            sys.executable, "manage.py", "engine_worker", "--channel", channel,
            "--device", "cpu", "--max-rows", "4", "--max-models", "1", *extra_args,
        ]  # fmt: skip
        super().__init__(argv, log_path, env=env, cwd=REPO)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        self.wait_until(lambda: self.stats() is not None, 60, "the engine worker to start")

    def stats(self) -> dict | None:
        workers = read_stats(self.channel)
        return workers[0] if workers else None

    def wait_until(self, predicate, timeout: float, what: str):
        return self.wait_for(predicate, what, timeout)

    def stop(self) -> int:
        return super().stop(grace=20)


@pytest.fixture(scope="session")
def engine_worker(redis_url, tmp_path_factory):
    channel = f"engine-test-{uuid.uuid4().hex[:12]}"
    worker = EngineWorkerProcess(channel, tmp_path_factory.mktemp("engine") / "worker.log")
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def engine(engine_worker, settings):
    """The engine worker, with the site's front ends pointed at its channel."""
    settings.CHAT_ENGINE_CHANNEL = engine_worker.channel
    return engine_worker


@pytest.fixture(autouse=True)
def fresh_channel_layer():
    """A new channel layer object per test. Each test runs on its own event loop, and a test
    that fails mid-receive would otherwise leave the shared layer marked as receiving on a
    dead loop, failing every later test with "Two event loops are trying to receive()"."""
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.fixture
def checkpoint(tiny_checkpoint_dir):
    from runs.models import Checkpoint

    return Checkpoint.objects.create(
        stage=Checkpoint.Stage.SFT, step=STEP, path=str(tiny_checkpoint_dir)
    )


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="pw-bob")


async def open_socket(user) -> WebsocketCommunicator:
    """A connected /ws/chat/ socket for `user`, through the site's websocket routes."""
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/chat/")
    communicator.scope["user"] = user
    connected, code = await communicator.connect()
    assert connected, f"refused with {code}"
    return communicator


async def frames_until(communicator, *types: str, timeout: float = 60) -> list[dict]:
    """Frames received up to and including the first of one of `types`."""
    frames = []
    while True:
        frame = await communicator.receive_json_from(timeout=timeout)
        frames.append(frame)
        if frame["type"] in types:
            return frames


def run(coroutine_function):
    """Run an async test body (with its own event loop, like a server would)."""
    return async_to_sync(coroutine_function)()


class FollowedRun:
    """A running SFT run whose checkpoint directory (a copy of the tiny one) gains steps during
    a test, as a training run's does: `save(step)` writes the step's files and its row."""

    def __init__(self, source: Path, directory: Path, owner) -> None:
        from runs.models import Run

        shutil.copytree(source, directory)
        self.directory = directory
        self.run = Run.objects.create(kind="sft", owner=owner, status="running")

    def save(self, step: int):
        from runs.models import Checkpoint

        if step != STEP:
            for name in ("model_{:06d}.pt", "meta_{:06d}.json"):
                shutil.copy(self.directory / name.format(STEP), self.directory / name.format(step))
        return Checkpoint.objects.create(
            run=self.run, stage=Checkpoint.Stage.SFT, step=step, path=str(self.directory)
        )


@pytest.fixture
def followed_run(tmp_path, tiny_checkpoint_dir, alice) -> FollowedRun:
    """A running run that has saved the tiny model (step STEP) so far."""
    followed = FollowedRun(tiny_checkpoint_dir, tmp_path / "sft_checkpoints" / "d2", alice)
    followed.save(STEP)
    return followed
