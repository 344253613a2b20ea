"""training.runtime: the compile default, and device auto under torchrun."""

import os

import pytest
import torch

from training import runtime as runtime_module
from training.base_train import FLAGS as BASE_FLAGS
from training.runtime import Runtime, compile_enabled, init_runtime, maybe_compile


def test_compile_defaults_to_on_for_cuda_only():
    assert compile_enabled(None, torch.device("cuda", 0))
    assert not compile_enabled(None, torch.device("cpu"))
    assert not compile_enabled(None, torch.device("mps"))
    assert compile_enabled(True, torch.device("cpu"))
    assert not compile_enabled(False, torch.device("cuda"))


def test_compile_flag_is_unset_by_default_and_takes_both_spellings():
    assert BASE_FLAGS.parse([])["compile"] is None
    assert BASE_FLAGS.parse(["--compile"])["compile"] is True
    assert BASE_FLAGS.parse(["--no-compile"])["compile"] is False
    assert BASE_FLAGS.validate({"compile": "false"})["compile"] is False


def test_maybe_compile_leaves_a_cpu_model_alone_unless_asked():
    model = torch.nn.Linear(2, 2)
    cpu = Runtime(torch.device("cpu"), torch.float32, 0, 0, 1)
    assert maybe_compile(model, None, cpu) is model
    assert maybe_compile(model, False, cpu) is model
    compiled = maybe_compile(model, True, cpu)
    assert compiled is not model and compiled._orig_mod is model


def test_device_auto_under_torchrun_without_cuda_names_the_fix(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(runtime_module, "autodetect_device", lambda: torch.device("cpu"))
    with pytest.raises(RuntimeError, match="WORLD_SIZE=8; pass --device cpu"):
        init_runtime("auto")


def test_device_auto_alone_on_a_cpu_is_fine(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(runtime_module, "autodetect_device", lambda: torch.device("cpu"))
    assert init_runtime("auto").device == torch.device("cpu")


def test_training_processes_get_expandable_segments_unless_the_user_chose(monkeypatch):
    # Plain torchrun launches (outside the site) get the allocator setting too, before CUDA
    # starts; a value the user set, under either name, is left as it is.
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    init_runtime(device="cpu")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")
    init_runtime(device="cpu")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == ""

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
    init_runtime(device="cpu")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
