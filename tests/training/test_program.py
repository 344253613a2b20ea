"""How programs end: exit codes and the `end` event for success, user errors, bugs and cancel."""

import signal
import subprocess
import sys
import time

import pytest

from tests.training.conftest import read_events
from training.events import EventWriter
from training.program import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, run_program


def ends(run_dir) -> list[dict]:
    return [e for e in read_events(run_dir) if e["type"] == "end"]


def test_success_user_error_and_bug(tmp_path):
    with EventWriter(tmp_path / "ok") as events:
        assert run_program(events, lambda: None) == EXIT_OK
    assert [e["status"] for e in ends(tmp_path / "ok")] == ["succeeded"]

    def bad_input():
        raise ValueError("depth must be positive")

    with EventWriter(tmp_path / "bad") as events:
        assert run_program(events, bad_input) == EXIT_ERROR
    (end,) = ends(tmp_path / "bad")
    assert (end["status"], end["error"]) == ("failed", "ValueError: depth must be positive")

    def bug():
        raise ZeroDivisionError("oops")

    with EventWriter(tmp_path / "bug") as events, pytest.raises(ZeroDivisionError):
        run_program(events, bug)
    assert ends(tmp_path / "bug")[0]["status"] == "failed"


def base_train_cmd(tiny_corpus, out, *extra):
    data_dir, tokenizer_dir = tiny_corpus
    return [sys.executable, "-m", "training.base_train", "--config", "tiny",
            "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
            "--checkpoint-dir", str(out / "ckpt"), "--run-dir", str(out / "run"), *extra]  # fmt: skip


def test_impossible_batch_is_one_clear_line_and_a_failed_event(tiny_corpus, tmp_path):
    done = subprocess.run(base_train_cmd(tiny_corpus, tmp_path, "--total-batch-size", "1000"),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == EXIT_ERROR
    assert "error: total_batch_size (1000) must be a multiple of" in done.stderr
    assert "Traceback" not in done.stderr
    assert ends(tmp_path / "run")[0]["status"] == "failed"


@pytest.mark.timeout(120)
def test_sigterm_cancels_and_records_it(tiny_corpus, tmp_path):
    proc = subprocess.Popen(base_train_cmd(tiny_corpus, tmp_path, "--num-iterations", "100000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        events_file = tmp_path / "run" / "events.jsonl"
        while not (events_file.exists() and '"metrics"' in events_file.read_text()):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == EXIT_CANCELLED
    finally:
        proc.kill()
    (end,) = ends(tmp_path / "run")
    assert end["status"] == "cancelled"
