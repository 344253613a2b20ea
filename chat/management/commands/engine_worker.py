"""`manage.py engine_worker`: serve chat generation requests from the channel layer.

One per GPU: pin it with --device cuda:N, where N counts within the GPUs CUDA_VISIBLE_DEVICES
lets the process see (with CUDA_VISIBLE_DEVICES=7, GPU 7 is cuda:0). `manage.py up` starts one.
SIGINT/SIGTERM stop it cleanly: replies in progress get an error, its stats key is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from channels.layers import get_channel_layer
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from chat.engine_worker import EngineWorker
from engine.engine import resolve_device


class Command(BaseCommand):
    help = "Serve chat generation requests from the channel layer's engine channel."

    def add_arguments(self, parser):
        parser.add_argument(
            "--device",
            default=settings.CHAT_ENGINE_DEVICE,
            help="auto, cpu, mps, cuda or cuda:N: the one device this worker decodes on; N counts "
            "within CUDA_VISIBLE_DEVICES (default: %(default)s)",
        )
        parser.add_argument(
            "--cuda-graphs",
            action="store_true",
            help="replay each decode step from a captured CUDA graph (CUDA devices only)",
        )
        parser.add_argument(
            "--max-rows",
            type=int,
            default=settings.CHAT_ENGINE_MAX_ROWS,
            help="replies decoded at once (default: %(default)s)",
        )
        parser.add_argument(
            "--max-models",
            type=int,
            default=settings.CHAT_ENGINE_MAX_MODELS,
            help="checkpoints kept loaded (default: %(default)s)",
        )
        parser.add_argument("--channel", default=settings.CHAT_ENGINE_CHANNEL,
                            help="channel to take requests from (default: %(default)s)")  # fmt: skip

    def handle(self, *args, device, cuda_graphs, max_rows, max_models, channel, **options):
        if max_rows < 1 or max_models < 1:
            raise CommandError("--max-rows and --max-models must be at least 1")
        try:
            chosen = resolve_device(device, "--device")
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if cuda_graphs and chosen.type != "cuda":
            raise CommandError(
                f"--cuda-graphs needs a CUDA --device; this worker decodes on {chosen}"
            )
        layer = get_channel_layer()
        if layer is None:
            raise CommandError("no channel layer is configured (CHANNEL_LAYERS)")
        worker = EngineWorker(
            layer,
            channel=channel,
            device=chosen,
            cuda_graphs=cuda_graphs,
            max_rows=max_rows,
            max_models=max_models,
            chunk_interval=settings.CHAT_CHUNK_INTERVAL,
            stats_interval=settings.CHAT_ENGINE_STATS_INTERVAL,
            redis_url=settings.REDIS_URL,
        )
        asyncio.run(_serve(worker))


async def _serve(worker: EngineWorker) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    # A signal cancels us; run() has then said goodbye to every reply in progress.
    with contextlib.suppress(asyncio.CancelledError):
        await worker.run()
