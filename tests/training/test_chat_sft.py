"""chat_sft end to end on CPU: events, checkpoint, learning, horizon, bad inputs, DDP."""

import json
import re
import subprocess
import sys

import pytest
import torch

from engine import checkpoint as ckpt
from engine.tokenizer import Tokenizer
from tests.training.conftest import read_events, stdlib_documents
from tests.training.test_finetune import (
    chat,
    hand_made_conversations,
    make_source_checkpoint,
    varied_conversations,
)
from training import chat_sft
from training.dataloader import sft_batches
from training.tasks.registry import parse_mixture

pytestmark = pytest.mark.timeout(240)


def write_jsonl(path, conversations) -> str:
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    return f"customjson:{path}"


@pytest.fixture
def source(tiny_corpus, tmp_path):
    return make_source_checkpoint(tmp_path / "base_checkpoints" / "d2", tiny_corpus[1])


def sft_args(source, out, mixture, *extra):
    return [
        "--config", "tiny",
        "--source-dir", str(source),
        "--checkpoint-dir", str(out / "ckpt"),
        "--run-dir", str(out / "run"),
        "--mixture", mixture,
        *extra,
    ]  # fmt: skip


def of_type(events, kind):
    return [e for e in events if e["type"] == kind]


def test_tiny_sft_run_writes_every_event_and_a_loadable_sft_checkpoint(source, tmp_path):
    mixture = write_jsonl(tmp_path / "chats.jsonl",
                          hand_made_conversations() + varied_conversations(30))  # fmt: skip
    out = tmp_path / "out"
    assert chat_sft.main(sft_args(source, out, mixture, "--report-dir", str(out / "report"))) == 0
    events = read_events(out / "run")
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "end" and events[-1]["status"] == "succeeded"
    start = events[0]
    assert start["total_steps"] == 20 and start["program"] == "chat_sft"
    assert start["derived"]["source"]["checkpoint_dir"] == str(source)
    metrics = of_type(events, "metrics")
    assert [e["step"] for e in metrics] == list(range(1, 21))
    for key in ("train/loss", "train/lr", "train/tok_per_sec", "train/trained_tokens"):
        assert all(e["values"][key] >= 0 for e in metrics), key
    # Only assistant tokens are trained on: far fewer than the 4 x 64 tokens of a step.
    assert all(0 < e["values"]["train/trained_tokens"] < 4 * 64 for e in metrics)
    assert [e["step"] for e in of_type(events, "eval")] == [0, 10, 20]
    assert all(e["values"]["val/bpb"] > 0 for e in of_type(events, "eval"))
    assert [e["step"] for e in of_type(events, "checkpoint")] == [20]
    assert of_type(events, "report")[0]["markdown"].startswith("## Chat SFT")
    assert types.index("report") < types.index("end")

    model, meta = ckpt.load_model(out / "ckpt")
    assert meta["step"] == 20 and meta["stage"] == "sft" and meta["mixture"] == mixture
    assert meta["source"] == {"checkpoint_dir": str(source), "step": 0, "stage": "base",
                              "model_tag": "d2"}  # fmt: skip
    assert meta["val_bpb"] == pytest.approx(of_type(events, "eval")[-1]["values"]["val/bpb"])
    base, _ = ckpt.load_model(source)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)  # it trained
    assert ckpt.load_tokenizer_for(out / "ckpt").vocab_size == 512
    section = (out / "report" / "chat_sft.md").read_text()
    assert section.startswith("## Chat SFT") and "- mixture: customjson:" in section


def test_loss_falls_on_a_small_repeated_mixture(source, tmp_path):
    conversations = [
        chat("What is the capital of France?", "Paris is the capital of France."),
        chat("Say hello.", "Hello there, friend!"),
        chat("Count to three.", "One, two, three."),
        chat("What color is grass?", "Grass is green."),
    ]
    mixture = write_jsonl(tmp_path / "small.jsonl", conversations)
    out = tmp_path / "out"
    args = sft_args(source, out, mixture, "--num-iterations", "30", "--eval-every", "30",
                    "--init-lr-frac", "1.0")  # fmt: skip
    assert chat_sft.main(args) == 0
    evals = of_type(read_events(out / "run"), "eval")
    first, last = evals[0]["values"]["val/loss"], evals[-1]["values"]["val/loss"]
    assert [e["step"] for e in evals] == [0, 30]
    assert last < 0.5 * first, (first, last)


def test_epochs_set_the_horizon_from_the_packed_mixture(source, tmp_path, tiny_corpus):
    conversations = varied_conversations(40)
    mixture = write_jsonl(tmp_path / "chats.jsonl", conversations)
    out = tmp_path / "out"
    args = sft_args(source, out, mixture, "--num-iterations", "-1", "--num-epochs", "2",
                    "--eval-every", "-1")  # fmt: skip
    assert chat_sft.main(args) == 0
    events = read_events(out / "run")
    # What one process packing the (mixture-shuffled) conversations twice yields, in batches.
    tokenizer = Tokenizer.load(tiny_corpus[1])
    shuffled = parse_mixture(mixture, "train")
    expected = sum(1 for _ in sft_batches(shuffled, tokenizer, 4, 64, num_epochs=2))
    assert events[0]["total_steps"] == expected
    assert events[0]["derived"]["horizon_source"] == "num_epochs"
    metrics = of_type(events, "metrics")
    assert len(metrics) == expected and metrics[-1]["values"]["train/epoch"] == pytest.approx(2.0)


def test_a_tokenizer_of_another_vocabulary_is_refused_in_one_line(source, tmp_path, capsys):
    other = tmp_path / "tok300"
    Tokenizer.train(stdlib_documents(50), vocab_size=300).save(other)  # fmt: skip
    mixture = write_jsonl(tmp_path / "chats.jsonl", varied_conversations(5))
    out = tmp_path / "out"
    assert chat_sft.main(sft_args(source, out, mixture, "--tokenizer-dir", str(other))) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(source) in err and "512" in err and "300" in err
    end = read_events(out / "run")[-1]
    assert end["type"] == "end" and end["status"] == "failed"
    assert not (out / "ckpt").exists()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_source", r"error: source_dir: checkpoint directory .*nowhere does not exist"),
        ("empty_source", r"error: source_dir: no complete checkpoint .* in .*empty"),
        ("empty_file", r"error: mixture: .*empty\.jsonl: no conversations"),
        ("malformed", r"error: mixture: .*bad\.jsonl:2: message 0 has role 'assistant'"),
        ("unknown_task", r"error: mixture: unknown task 'smoltalkk'"),
        ("bad_val", r"error: val_mixture: unknown task 'nope'"),
        ("batch", r"error: total_batch_size: 100 tokens per step must be a multiple"),
        ("seq_len", r"error: max_seq_len: 128 is longer than the model's context \(64"),
    ],
)  # fmt: skip
def test_bad_inputs_fail_with_one_clear_line(source, tmp_path, capsys, case, expected):
    good = write_jsonl(tmp_path / "good.jsonl", varied_conversations(5))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.jsonl").write_text("\n")
    lines = [chat("a", "b"), {"messages": [{"role": "assistant", "content": "x"}]}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(c) + "\n" for c in lines))
    out = tmp_path / "out"
    args = {
        "missing_source": sft_args(tmp_path / "nowhere", out, good),
        "empty_source": sft_args(tmp_path / "empty", out, good),
        "empty_file": sft_args(source, out, f"customjson:{tmp_path / 'empty.jsonl'}"),
        "malformed": sft_args(source, out, f"identity,customjson:{tmp_path / 'bad.jsonl'}"),
        "unknown_task": sft_args(source, out, "smoltalkk"),
        "bad_val": sft_args(source, out, good, "--val-mixture", "nope"),
        "batch": sft_args(source, out, good, "--total-batch-size", "100"),
        "seq_len": sft_args(source, out, good, "--max-seq-len", "128"),
    }[case]
    assert chat_sft.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(expected, err), err
    assert read_events(out / "run")[-1]["status"] == "failed"


def test_two_processes_match_one_process_with_double_accumulation(tmp_path, tiny_corpus):
    # Identical conversations make every packed row identical whichever rank packs it, so
    # both layouts see the same data and only the distributed arithmetic differs.
    source = make_source_checkpoint(tmp_path / "src" / "d2", tiny_corpus[1])
    conversation = chat("Say hi.", "Hi there!")
    per_row = 65 // len(Tokenizer.load(tiny_corpus[1]).render_conversation(conversation)[0])
    # Every row full of whole conversations: 2 steps of 4 rows on each of 2 ranks, no remainder.
    mixture = write_jsonl(tmp_path / "same.jsonl", [conversation] * (per_row * 4 * 2 * 2))

    def run(name, nproc, *extra):
        out = tmp_path / name
        args = sft_args(source, out, mixture, "--num-iterations", "-1", "--eval-every", "-1",
                        "--eval-steps", "1", *extra)  # fmt: skip
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", "-m", "training.chat_sft"]  # fmt: skip
        done = subprocess.run(launcher + args, capture_output=True, text=True, timeout=200)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        events = read_events(out / "run")
        return events[0]["total_steps"], [
            e["values"]["train/loss_raw"] for e in of_type(events, "metrics")
        ]

    steps_one, one = run("one", 1, "--total-batch-size", "512")  # 4 x 64 x 1 x 2 accumulation
    steps_two, two = run("two", 2)  # 4 x 64 x 2 processes x 1 accumulation step
    assert steps_one == steps_two == len(one) == len(two) == 2
    assert two == pytest.approx(one, abs=1e-3)
