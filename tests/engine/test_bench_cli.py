"""engine.bench and engine.chat_cli: run as subprocesses the way users run them, and in-process
for the error paths and the tool-call display."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import bench, chat_cli
from engine.chat_cli import ReplyPrinter
from engine.checkpoint import save_checkpoint, tokenizer_dir
from engine.models.gpt import GPT, GPTConfig
from engine.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "What is 12*34? It is 408. What is 2+3*4? It is 14.",
    "Hello! How are you today? I am fine, thank you.",
]
TINY_BENCH = [
    "--depth", "2", "--head-dim", "32", "--n-embd", "64", "--vocab", "300",
    "--sequence-len", "64", "--prompt-len", "8", "--gen", "8", "--samples", "2",
    "--repeats", "1", "--threads", "1", "--device", "cpu",
]  # fmt: skip


def run_module(*args, stdin=None):
    # One intra-op thread: these models are tiny, and the test machine is shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS * 20, vocab_size=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("sft_checkpoints") / "d2"
    config = GPTConfig(
        sequence_len=128,
        vocab_size=tokenizer.vocab_size,
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        n_embd=64,
    )
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # untrained but not flat, so the reply is varied text
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    save_checkpoint(directory, 5, model_state=model.state_dict(), model_config=config)
    tokenizer.save(tokenizer_dir(directory))
    return directory


# ---- bench ----------------------------------------------------------------------------------


def test_bench_prints_three_positive_speeds():
    result = run_module("engine.bench", *TINY_BENCH)
    assert result.returncode == 0, result.stderr
    pattern = r"^(prefill|decode, 1 stream|decode, 2 samples): ([\d.]+) tok/s"
    speeds = {name: float(v) for name, v in re.findall(pattern, result.stdout, re.MULTILINE)}
    assert set(speeds) == {"prefill", "decode, 1 stream", "decode, 2 samples"}
    assert all(speed > 0 for speed in speeds.values())


@pytest.fixture
def restore_threads():
    """bench sets torch's thread count (--threads) for the process it runs in."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_json_output(capsys, restore_threads):
    assert bench.main([*TINY_BENCH, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("prefill_tok_per_s", "decode_tok_per_s", "decode_samples_tok_per_s"):
        assert report[key] > 0
    assert report["config"]["n_embd"] == 64 and report["config"]["n_head"] == 2


def test_bench_measures_the_static_decode_step_beside_eager(capsys, restore_threads):
    assert bench.main([*TINY_BENCH, "--static-decode", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["static_decode_tok_per_s"] > 0
    assert report["static_decode_samples_tok_per_s"] > 0
    assert "graphs_decode_tok_per_s" not in report
    assert "x eager" in bench.format_report(report)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cuda-graphs"], "--cuda-graphs needs a CUDA --device, not cpu"),
        (["--device", "tpu:0"], "--device 'tpu:0': not a device"),
    ],
)
def test_bench_names_the_flag_of_a_device_it_cannot_use(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY_BENCH, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_bench_refuses_cuda_n_without_cuda(capsys):
    with pytest.raises(SystemExit):
        bench.main([*TINY_BENCH, "--device", "cuda:1"])
    assert "--device cuda:1: CUDA is not available" in capsys.readouterr().err


def test_bench_rejects_a_width_that_is_not_whole_heads(capsys, restore_threads):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY_BENCH, "--n-embd", "80"])
    assert exit_info.value.code == 2
    assert "--n-embd 80 must be a multiple of --head-dim 32" in capsys.readouterr().err


def test_bench_runs_a_saved_checkpoint(checkpoint, capsys, restore_threads):
    args = ["--checkpoint", str(checkpoint), "--prompt-len", "4", "--gen", "4", "--samples", "2"]
    assert bench.main([*args, "--repeats", "1", "--threads", "1", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["vocab_size"] == 300


# ---- chat CLI -------------------------------------------------------------------------------


def test_chat_cli_answers_one_prompt_and_exits(checkpoint):
    args = ["--checkpoint", str(checkpoint), "-p", "Hello! How are you?", "--max-tokens", "16"]
    result = run_module("engine.chat_cli", *args, "--seed", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_chat_cli_keeps_a_conversation_and_clears_it(checkpoint):
    args = ["--checkpoint", str(checkpoint), "--step", "5", "--max-tokens", "8", "--device", "cpu"]
    stdin = "Hello!\nWhat is 12*34?\nclear\nHi again\nquit\n"
    result = run_module("engine.chat_cli", *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant: ") == 3
    assert "(conversation cleared)" in result.stdout


def test_chat_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat_cli.main(["--checkpoint", str(tmp_path / "nope"), "-p", "hi", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_reply_printer_shows_tool_calls_and_rebuilds_the_message(tokenizer):
    special = tokenizer.encode_special
    tokens = [
        *tokenizer.encode("Let me compute."),
        special("<|python_start|>"),
        *tokenizer.encode("12*34"),
        special("<|python_end|>"),
        special("<|output_start|>"),
        *tokenizer.encode("408"),
        special("<|output_end|>"),
        *tokenizer.encode(" It is 408."),
        special("<|assistant_end|>"),
        *tokenizer.encode("never shown"),
    ]
    out = io.StringIO()
    printer = ReplyPrinter(tokenizer, out)
    for token in tokens:
        if not printer.feed(token):
            break
    message = printer.finish()
    assert out.getvalue() == "Let me compute.[python: 12*34][output: 408] It is 408.\n"
    assert message == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": " It is 408."},
        ],
    }
    # The rebuilt message renders back to the tokens the model produced.
    reply = tokens[: tokens.index(special("<|assistant_end|>")) + 1]
    ids, _ = tokenizer.render_conversation(
        {"messages": [{"role": "user", "content": "q"}, message]}
    )
    assert ids[-len(reply) :] == reply
