"""training.gpu_check: the GPU check's CPU rehearsal runs every step and prints one table."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training import gpu_check

REPO = Path(__file__).resolve().parents[2]


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """{check: {column: cell}} from the markdown table."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(columns, cells, strict=True))
    return rows


def number(cell: str) -> float:
    return float(cell.rstrip("%").replace(",", ""))


@pytest.mark.timeout(600)
def test_cpu_rehearsal_trains_benchmarks_and_prints_the_table(tmp_path):
    out = tmp_path / "table.md"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu"}
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "training.gpu_check", "--work-dir", str(tmp_path / "work"),
         "--out", str(out), "--budget-s", "400"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=550,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert text in done.stdout  # the printed table is the written one
    assert text.startswith("gpu-check ") and "device cpu" in text.splitlines()[0]
    rows = parse_table(text)
    assert list(rows) == [
        "data: corpus + tokenizer",
        "CUDA tests (pytest -m cuda tests/gpu)",
        "train d3 auto batch",
        "train d2 fp32 eager",
        "engine decode, 1 row",
        "engine decode, 8 rows",
        "engine decode, 1 row, static shapes",
        "engine decode, 8 rows, static shapes",
        "attention sdpa, full",
        "attention sdpa, window 64",
    ]
    for name in ("train d2 fp32 eager", "train d3 auto batch"):
        row = rows[name]
        assert number(row["tok/s"]) > 0
        assert row["MFU"] == "n/a" and row["peak GiB measured"] == "n/a"  # CUDA-only numbers
        assert 0 < number(row["peak GiB predicted"]) < 1  # training.memory, tiny model
        loss = re.search(r"loss ([\d.]+) -> ([\d.]+)", row["notes"])
        assert loss, row["notes"]
    # auto batch: the largest power of two dividing 512 tokens / 64 per row
    assert rows["train d3 auto batch"]["notes"].startswith("B=8 x T=64, accum 1, 3 steps")
    assert rows["train d2 fp32 eager"]["notes"].startswith("B=2 x T=64, accum 2, 4 steps")
    for n in ("1 row", "8 rows", "1 row, static shapes", "8 rows, static shapes"):
        assert number(rows[f"engine decode, {n}"]["decode tok/s"]) > 0
    for window in ("full", "window 64"):
        assert number(rows[f"attention sdpa, {window}"]["tok/s"]) > 0
    assert time.monotonic() - started < 300


def test_a_failing_step_becomes_a_failed_row_and_the_rest_still_runs(tmp_path):
    check = gpu_check.Check(gpu_check.CPU, tmp_path, time.monotonic() + 60, env=dict(os.environ))

    def broken():
        check.run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30, "broken")
        return []

    gpu_check.step(check, "broken step", broken)
    gpu_check.step(check, "fine step", lambda: [gpu_check.Row("fine step", tok_s=1234.5)])
    assert [row.check for row in check.rows] == ["broken step", "fine step"]
    assert not check.rows[0].ok and "exit 3: boom" in check.rows[0].notes
    assert (tmp_path / "broken.log").read_text() == "boom\n"
    assert check.rows[1].ok
    table = gpu_check.table(check.rows)
    assert "| fine step | 1,234 | n/a | n/a | n/a | n/a |  |" in table


def test_a_spent_budget_skips_the_step_and_a_slow_child_is_stopped(tmp_path):
    check = gpu_check.Check(gpu_check.CPU, tmp_path, time.monotonic() + 8, env=dict(os.environ))
    started = time.monotonic()
    gpu_check.step(
        check,
        "slow",
        lambda: check.run(
            [sys.executable, "-c", "import time; time.sleep(60)"], 30, "slow"
        ),  # fmt: skip
    )
    assert time.monotonic() - started < 20
    assert "timed out" in check.rows[0].notes and not check.rows[0].ok
    gpu_check.step(check, "late", lambda: [])
    assert check.rows[1].notes == "skipped: time budget spent"


def test_children_get_expandable_segments_unless_the_caller_chose(monkeypatch, tmp_path):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    env = gpu_check.child_env(tmp_path, "cuda")
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["NANOCHAT_HOME"] == str(tmp_path)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    assert (
        gpu_check.child_env(tmp_path, "cuda")["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"
    )
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:32")  # the newer name
    assert "PYTORCH_CUDA_ALLOC_CONF" not in gpu_check.child_env(tmp_path, "cuda")
