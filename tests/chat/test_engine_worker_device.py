"""`manage.py engine_worker --device cuda:N / --cuda-graphs`: the checks that run before the worker
starts (CUDA faked where it is absent), and what its stats say about its device."""

import pytest
import torch
from django.core.management import CommandError, call_command

from chat import engine_worker as worker_module
from chat.engine_worker import EngineWorker


def fake_gpus(monkeypatch, count, name="NVIDIA H200"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"{name} #{index}")


def test_a_gpu_index_past_the_visible_ones_is_refused_naming_the_flag(monkeypatch):
    fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with pytest.raises(CommandError) as error:
        call_command("engine_worker", "--device", "cuda:1")
    message = str(error.value)
    assert message.startswith("--device cuda:1: this process sees 1 CUDA device(s)")
    assert "CUDA_VISIBLE_DEVICES=7" in message and "cuda:0 to cuda:0" in message


def test_cuda_absent_is_refused_naming_the_flag(monkeypatch):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(CommandError, match=r"^--device cuda:0: CUDA is not available"):
        call_command("engine_worker", "--device", "cuda:0")


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(CommandError, match=r"^--cuda-graphs needs a CUDA --device"):
        call_command("engine_worker", "--device", "cpu", "--cuda-graphs")


def test_a_device_that_is_not_one_is_refused():
    with pytest.raises(CommandError, match=r"^--device 'gpu1': not a device"):
        call_command("engine_worker", "--device", "gpu1")


def make_worker(device, **options):
    return EngineWorker(
        None, channel="engine", device=device, max_rows=4, max_models=1,
        chunk_interval=0.02, stats_interval=1.0, **options,
    )  # fmt: skip


def test_stats_report_the_device_and_for_a_gpu_which_one(monkeypatch):
    stats = make_worker(torch.device("cpu")).stats()
    assert stats["device"] == "cpu" and stats["cuda_graphs"] is False
    assert "device_name" not in stats
    fake_gpus(monkeypatch, 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    stats = make_worker(torch.device("cuda", 0), cuda_graphs=True).stats()
    assert stats["device"] == "cuda:0" and stats["cuda_graphs"] is True
    assert stats["device_name"] == "NVIDIA H200 #0"
    assert stats["cuda_visible_devices"] == "7"
    assert worker_module.device_details(torch.device("cuda", 3))["device_name"].endswith("#3")
