"""Chat evaluation: categorical scoring, batched generation, ChatCORE and the program end to end."""

import json

import pytest
import torch

from engine import checkpoint as ckpt
from engine.engine import Engine
from engine.models.gpt import GPT, GPTConfig
from engine.tokenizer import Tokenizer
from tests.training.conftest import read_events
from training import chat_eval
from training.runtime import Runtime
from training.tasks.registry import CHATCORE_BASELINES, chat_eval_tasks

CPU = Runtime(torch.device("cpu"), torch.float32, rank=0, local_rank=0, world_size=1)


def tiny_model(vocab_size: int, seed: int = 0, sequence_len: int = 128) -> GPT:
    """A depth-2 GPT whose random weights give varied, non-trivial logits.

    The standard init (zero output projections, a near-zero lm_head) makes every logit almost
    equal; larger random weights make argmaxes and samples depend on the whole forward.
    """
    torch.manual_seed(seed)
    config = GPTConfig.from_depth(2, vocab_size=vocab_size, sequence_len=sequence_len,
                                  aspect_ratio=32, head_dim=32, window_pattern="SL")  # fmt: skip
    model = GPT(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
    return model.eval()


def save_tiny_checkpoint(directory, tokenizer_dir, *, stage=None, vocab_size=None, seed=0):
    """A random tiny model saved like a training program would, with its tokenizer beside it."""
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = tiny_model(vocab_size or tokenizer.vocab_size, seed)
    meta = {"stage": stage} if stage else {}
    ckpt.save_checkpoint(directory, 5, model_state=model.state_dict(), model_config=model.config,
                         meta=meta)  # fmt: skip
    tokenizer.save(ckpt.tokenizer_dir(directory))
    return directory


def mc_conversation(question: str, choices: list[str], answer: str) -> dict:
    letters = ["A", "B", "C", "D"][: len(choices)]
    lines = "\n".join(f"- {c}={letter}" for c, letter in zip(choices, letters, strict=True))
    return {
        "messages": [
            {"role": "user", "content": f"Multiple Choice question: {question}\n{lines}"},
            {"role": "assistant", "content": answer},
        ],
        "letters": letters,
    }


MC = [
    mc_conversation("What is the capital of France?", ["Paris", "Rome", "Oslo", "Bern"], "A"),
    mc_conversation("Which is a mammal?", ["trout", "whale", "eagle"], "B"),
    mc_conversation("2 + 2 = ?", ["3", "4", "5", "22"], "B"),
    mc_conversation("The opposite of hot is", ["cold", "warm"], "A"),
    mc_conversation(
        "Which planet is largest? Think about the gas giants and their sizes.",
        ["Mars", "Venus", "Jupiter", "Mercury"],
        "C",
    ),  # fmt: skip
]


def test_categorical_scoring_picks_the_argmax_letter_of_a_plain_forward(tiny_corpus):
    tokenizer = Tokenizer.load(tiny_corpus[1])
    model = tiny_model(tokenizer.vocab_size)
    # Batches of 2 mix prompts of different lengths, so right padding is exercised.
    chosen = chat_eval.score_categorical(model, tokenizer, MC, CPU, batch_size=2)
    expected = []
    for conversation in MC:
        ids = tokenizer.render_for_completion(conversation)
        with torch.no_grad():
            last = model(torch.tensor([ids]))[0, -1]
        letter_ids = [tokenizer.encode(letter)[0] for letter in conversation["letters"]]
        expected.append(conversation["letters"][int(last[letter_ids].argmax())])
    assert chosen == expected
    # The letter set limits the answer: a two-choice question never gets "C" or "D".
    assert chosen[3] in ("A", "B")
    # The same in one batch and one at a time.
    assert chat_eval.score_categorical(model, tokenizer, MC, CPU, batch_size=8) == expected


def test_letter_that_is_several_tokens_is_a_clear_error(tiny_corpus):
    tokenizer = Tokenizer.load(tiny_corpus[1])
    with pytest.raises(ValueError, match="exactly one token"):
        chat_eval.letter_ids(tokenizer, ["A", "Zebra-quux-and-more"])


def test_batched_generation_matches_one_prompt_at_a_time(tiny_corpus):
    """Continuous batching (prompts queued behind a full batch) gives each prompt exactly the
    greedy reply it gets alone."""
    tokenizer = Tokenizer.load(tiny_corpus[1])
    model = tiny_model(tokenizer.vocab_size)
    prompts = [tokenizer.render_for_completion(c) for c in MC]
    batched = chat_eval.generate_samples(model, tokenizer, prompts, max_new_tokens=12,
                                         temperature=0.0, max_rows=2)  # fmt: skip
    engine = Engine(model, tokenizer)
    stops = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    for prompt, (sample,) in zip(prompts, batched, strict=True):
        sequences, _ = engine.generate_batch(prompt, max_tokens=12, temperature=0.0)
        alone = sequences[0][len(prompt) :]
        body = sample.tokens[:-1] if sample.tokens[-1] in stops else sample.tokens
        assert body == alone
        assert sample.text == tokenizer.decode(alone)
        assert len(sample.masks) == len(sample.tokens)


def test_several_samples_per_prompt_come_back_in_order_and_differ(tiny_corpus):
    tokenizer = Tokenizer.load(tiny_corpus[1])
    model = tiny_model(tokenizer.vocab_size)
    prompts = [tokenizer.render_for_completion(c) for c in MC[:3]]
    out = chat_eval.generate_samples(model, tokenizer, prompts, num_samples=3, max_new_tokens=10,
                                     temperature=1.0, max_rows=4, seed=7)  # fmt: skip
    assert [len(s) for s in out] == [3, 3, 3]
    assert len({tuple(s.tokens) for s in out[0]}) > 1
    again = chat_eval.generate_samples(model, tokenizer, prompts, num_samples=3, max_new_tokens=10,
                                       temperature=1.0, max_rows=9, seed=7)  # fmt: skip
    # Per-problem seeds: the batch size does not change what a problem's samples are.
    assert [[s.tokens for s in group] for group in out] == [
        [s.tokens for s in group] for group in again
    ]


def test_chatcore_is_the_mean_centred_accuracy_of_all_six_tasks():
    names = chat_eval_tasks()
    assert len(names) == 6
    accuracies = {name: 0.5 for name in names}
    expected = sum((0.5 - CHATCORE_BASELINES.get(n, 0.0)) / (1 - CHATCORE_BASELINES.get(n, 0.0))
                   for n in names) / 6  # fmt: skip
    assert chat_eval.chatcore(accuracies) == pytest.approx(expected)
    assert chat_eval.chatcore({n: 0.25 if "arc" in n or n == "mmlu" else 0.0 for n in names}) == 0
    assert chat_eval.chatcore({n: 1.0 for n in names}) == pytest.approx(1.0)
    del accuracies["humaneval"]
    assert chat_eval.chatcore(accuracies) is None


def test_column_comes_from_the_stage_then_the_folder(tmp_path):
    assert chat_eval.column_for(tmp_path, {"stage": "rl"}) == "RL"
    assert chat_eval.column_for(tmp_path / "mid_checkpoints" / "d4", {}) == "MID"
    assert chat_eval.column_for(tmp_path / "x" / "d4", {}) == "BASE"
    with pytest.raises(ValueError, match="--column"):
        chat_eval.column_for(tmp_path, {"stage": "weird"})


def test_unknown_task_names_are_refused():
    with pytest.raises(ValueError, match="tasks: unknown task"):
        chat_eval.parse_tasks("gsm8k,nope")
    assert chat_eval.parse_tasks("") == chat_eval_tasks()


def test_end_to_end_on_a_random_checkpoint(tiny_corpus, tmp_path):
    directory = save_tiny_checkpoint(tmp_path / "sft_checkpoints" / "d2", tiny_corpus[1],
                                     stage="sft")  # fmt: skip
    run_dir, report_dir = tmp_path / "run", tmp_path / "report"
    args = ["--config", "tiny", "--checkpoint-dir", str(directory), "--max-problems", "3",
            "--max-new-tokens", "16", "--run-dir", str(run_dir),
            "--report-dir", str(report_dir)]  # fmt: skip
    assert chat_eval.main(args) == 0
    events = read_events(run_dir)
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "end" and events[-1]["status"] == "succeeded"
    results = [e for e in events if e["type"] == "eval_result"]
    accuracy = {e["task"]: e for e in results if e["metric"] == "accuracy"}
    assert set(accuracy) == set(chat_eval_tasks())
    assert {e["data_source"] for e in results} == {"offline"}  # builtin tasks, not the hub's
    for event in accuracy.values():
        assert event["details"]["total"] == 3
        assert 0 <= event["value"] <= 1
        assert event["value"] == event["details"]["correct"] / 3
    formats = {e["task"]: e["value"] for e in results if e["metric"] == "format"}
    assert set(formats) == {"gsm8k", "spelling_bee"}
    assert all(0 <= v <= 1 for v in formats.values())
    (final,) = [e for e in events if e["type"] == "eval"]
    assert final["step"] == 5 and final["data_source"] == "offline"
    assert -1 <= final["values"]["chatcore"] <= 1
    assert final["values"]["gsm8k/accuracy"] == accuracy["gsm8k"]["value"]
    assert any(e["type"] == "sample" for e in events)
    assert "report" in types
    section = json.loads((report_dir / "chat_eval_sft.json").read_text())
    assert section["column"] == "SFT"
    assert set(section["summary"]) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval",
                                       "SpellingBee", "ChatCORE"}  # fmt: skip
    assert section["summary"]["ChatCORE"] == pytest.approx(final["values"]["chatcore"])
    assert (report_dir / "chat_eval_sft.md").read_text().startswith("## ")


def test_a_subset_of_tasks_reports_no_chatcore(tiny_corpus, tmp_path):
    directory = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus[1], stage="rl")
    run_dir, report_dir = tmp_path / "run", tmp_path / "report"
    args = ["--config", "tiny", "--checkpoint-dir", str(directory), "--tasks", "arc_easy,mmlu",
            "--max-problems", "4", "--run-dir", str(run_dir),
            "--report-dir", str(report_dir)]  # fmt: skip
    assert chat_eval.main(args) == 0
    events = read_events(run_dir)
    (final,) = [e for e in events if e["type"] == "eval"]
    assert "chatcore" not in final["values"]
    assert set(final["values"]) == {"arc_easy/accuracy", "mmlu/accuracy"}
    section = json.loads((report_dir / "chat_eval_rl.json").read_text())
    assert set(section["summary"]) == {"ARC-Easy", "MMLU"}
    assert "not computed" in (report_dir / "chat_eval_rl.md").read_text()


def test_humaneval_without_isolation_is_skipped_with_the_reason(tiny_corpus, tmp_path, monkeypatch):
    # bubblewrap missing and weak mode not allowed: HumanEval says why it has no score, the
    # other tasks are still evaluated, and ChatCORE (which needs all six) is left out.
    monkeypatch.setenv("NANOCHAT_BWRAP", str(tmp_path / "no-bwrap"))
    monkeypatch.delenv("NANOCHAT_SANDBOX", raising=False)
    directory = save_tiny_checkpoint(tmp_path / "ckpt", tiny_corpus[1], stage="sft")
    run_dir = tmp_path / "run"
    args = ["--config", "tiny", "--checkpoint-dir", str(directory), "--tasks",
            "arc_easy,humaneval", "--max-problems", "2", "--run-dir", str(run_dir)]  # fmt: skip
    assert chat_eval.main(args) == 0
    events = read_events(run_dir)
    results = {e["task"]: e for e in events if e["type"] == "eval_result"}
    assert results["humaneval"]["value"] is None
    assert "bubblewrap" in results["humaneval"]["details"]["skipped"]
    assert "NANOCHAT_SANDBOX=weak" in results["humaneval"]["details"]["skipped"]
    assert results["arc_easy"]["details"]["total"] == 2
    (final,) = [e for e in events if e["type"] == "eval"]
    assert set(final["values"]) == {"arc_easy/accuracy"}


def failure(run_dir) -> str:
    end = read_events(run_dir)[-1]
    assert end["type"] == "end" and end["status"] == "failed"
    return end["error"]


def test_missing_or_empty_checkpoint_dir_is_a_clear_error(tmp_path, capsys):
    assert chat_eval.main(["--config", "tiny", "--run-dir", str(tmp_path / "a")]) == 1
    assert "checkpoint_dir" in failure(tmp_path / "a")
    args = ["--config", "tiny", "--checkpoint-dir", str(tmp_path / "nowhere"),
            "--run-dir", str(tmp_path / "b")]  # fmt: skip
    assert chat_eval.main(args) == 1
    assert "does not exist" in failure(tmp_path / "b")
    (tmp_path / "empty").mkdir()
    args = ["--config", "tiny", "--checkpoint-dir", str(tmp_path / "empty"),
            "--run-dir", str(tmp_path / "c")]  # fmt: skip
    assert chat_eval.main(args) == 1
    assert "no complete checkpoint" in failure(tmp_path / "c")
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "Traceback" not in err


def test_vocab_mismatch_names_the_checkpoint(tiny_corpus, tmp_path):
    directory = save_tiny_checkpoint(tmp_path / "odd", tiny_corpus[1], vocab_size=600)
    args = ["--config", "tiny", "--checkpoint-dir", str(directory), "--run-dir", str(tmp_path)]
    assert chat_eval.main(args) == 1
    error = failure(tmp_path)
    assert str(directory) in error and "600" in error and "512" in error
