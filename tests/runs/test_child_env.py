"""The environment runs' programs start with (runs.execution.child_env)."""

import subprocess
import sys

from runs.execution import CUDA_ALLOC_CONF, child_env


def test_training_processes_get_expandable_segments_by_default(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    env = child_env()
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOC_CONF == "expandable_segments:True"
    # The child really sees it (the launcher passes env through unchanged).
    code = "import os; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "expandable_segments:True"


def test_a_users_own_allocator_setting_is_kept(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert child_env()["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # set to empty: the allocator's defaults
    assert child_env()["PYTORCH_CUDA_ALLOC_CONF"] == ""


def test_the_newer_variable_name_counts_as_the_users_choice(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:256")
    env = child_env()
    assert env["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:256"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env
