"""Tokenizer training and evaluation programs, run as a user would, on a tiny built-in corpus."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tokenizer import Tokenizer
from training import dataset, tok_eval, tok_train
from training.events import read_events

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    dataset.build_builtin_corpus(out, max_chars=100_000, num_shards=2)
    return out


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """(tokenizer dir, run dir, completed process) of one tok_train run with vocab 512."""
    root = tmp_path_factory.mktemp("tok")
    result = _program("tok_train", "--data-dir", corpus, "--out", root / "tokenizer",
                      "--vocab-size", "512", "--run-dir", root / "run")  # fmt: skip
    return root / "tokenizer", root / "run", result


def _program(name, *args, env=None):
    return subprocess.run([sys.executable, "-m", f"training.{name}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip


def _offline_env(tmp_path):
    # An empty tiktoken cache and a proxy that refuses connections: GPT-2/GPT-4 cannot load,
    # as on a machine without internet, even where this test has internet.
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    dead = "http://127.0.0.1:9"
    return {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "HTTPS_PROXY": dead,
            "https_proxy": dead, "HTTP_PROXY": dead, "http_proxy": dead}  # fmt: skip


def test_tok_train_saves_a_working_tokenizer_and_reports(trained, corpus):
    tokenizer_dir, run_dir, result = trained
    assert result.returncode == 0, result.stderr
    tokenizer = Tokenizer.load(tokenizer_dir)
    assert tokenizer.vocab_size == 512
    sample = next(dataset.iter_texts(corpus, "val"))
    assert tokenizer.decode(tokenizer.encode(sample)) == sample

    events = read_events(run_dir / "events.jsonl").events
    assert [e["type"] for e in events] == ["start", "tokenizer", "report", "end"]
    assert events[0]["config"]["vocab_size"] == 512
    assert events[1]["path"] == str(tokenizer_dir) and events[1]["vocab_size"] == 512
    report = events[2]
    assert report["section"] == "Tokenizer training"
    train_chars = sum(len(t) for t in dataset.iter_texts(corpus, "train"))
    assert "- vocab size: 512" in report["markdown"]
    assert f"- characters used: {train_chars:,}" in report["markdown"]  # doc cap 10k > any doc
    stats = tok_train.token_bytes_stats(tokenizer)
    assert f"- token bytes mean: {stats['mean']:.3f}" in report["markdown"]
    assert "training time:" in report["markdown"]
    assert events[3]["status"] == "succeeded"


def test_token_bytes_stats_skip_special_tokens(trained):
    tokenizer = Tokenizer.load(trained[0])
    stats = tok_train.token_bytes_stats(tokenizer)
    lengths = tokenizer.token_bytes()
    assert stats["special_tokens"] == 9
    assert stats["min"] == 1  # the 256 single-byte tokens
    assert stats["max"] == int(lengths.max())
    assert stats["mean"] == pytest.approx(float(lengths[:-9].float().mean()))


def test_train_tokenizer_counts_the_characters_it_used(corpus):
    _, info = tok_train.train_tokenizer(corpus, vocab_size=300, max_chars=5_000, doc_cap=1_000)
    assert info["characters"] == 5_000
    capped, needed = 0, 0
    for text in dataset.iter_texts(corpus, "train"):
        needed += 1
        capped += min(len(text), 1_000)
        if capped >= 5_000:
            break
    assert capped >= 5_000 and info["documents"] == needed


def test_tok_train_with_too_little_text_fails_clearly(tmp_path):
    dataset.write_corpus(tmp_path / "data", ["ab ab", "cd"], num_shards=2)
    result = _program("tok_train", "--data-dir", tmp_path / "data", "--out", tmp_path / "tok",
                      "--vocab-size", "4096", "--run-dir", tmp_path / "run")  # fmt: skip
    assert result.returncode == 1
    assert "smaller vocab_size" in result.stderr
    end = read_events(tmp_path / "run" / "events.jsonl").events[-1]
    assert end["type"] == "end" and end["status"] == "failed"
    assert not (tmp_path / "tok").exists()


def test_tok_eval_offline_prints_a_note_and_reports_our_columns(trained, corpus, tmp_path):
    tokenizer_dir = trained[0]
    run_dir = tmp_path / "run"
    result = _program("tok_eval", "--tokenizer", tokenizer_dir, "--data-dir", corpus,
                      "--run-dir", run_dir, env=_offline_env(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "GPT-2 columns skipped" in result.stdout
    assert "GPT-4 columns skipped" in result.stdout

    events = read_events(run_dir / "events.jsonl").events
    assert [e["type"] for e in events] == ["start", "eval", "report", "end"]
    values = events[1]["values"]
    kinds = [*tok_eval.SAMPLE_KINDS, "train", "val"]
    assert sorted(values) == sorted(f"tok/bytes_per_token/{k}" for k in kinds)
    tokenizer = Tokenizer.load(tokenizer_dir)
    news = tok_eval.sample_texts()["news"]
    expected = len(news.encode("utf-8")) / len(tokenizer.encode(news))
    assert values["tok/bytes_per_token/news"] == pytest.approx(expected)
    markdown = events[2]["markdown"]
    assert events[2]["section"] == "Tokenizer evaluation"
    assert "GPT-2 columns skipped" in markdown
    assert "| Text | Bytes | Ours tokens | Ours B/tok |" in markdown
    assert all(f"| {kind} |" in markdown for kind in kinds)
    assert events[3]["status"] == "succeeded"


def test_comparison_columns_and_relative_difference(trained, corpus):
    ours = Tokenizer.load(trained[0])
    smaller = Tokenizer.train(dataset.iter_texts(corpus, "train"), vocab_size=300)
    texts = tok_eval.sample_texts()
    rows = tok_eval.evaluate(ours, texts, {"Same": ours, "Small": smaller})
    assert [r.kind for r in rows] == list(tok_eval.SAMPLE_KINDS)
    for row in rows:
        assert row.relative_diff("Same") == 0
        theirs = len(smaller.encode(texts[row.kind]))
        assert row.baseline_tokens["Small"] == theirs
        assert row.relative_diff("Small") == pytest.approx(100 * (theirs - row.tokens) / theirs)
    # More merges mean fewer tokens on the English news text.
    assert rows[0].relative_diff("Small") > 0
    table = tok_eval.markdown_table(rows, ["Same", "Small"])
    assert "| Small tokens | Small B/tok | vs Small |" in table
    assert f"{rows[0].relative_diff('Small'):+.1f}%" in table
    values = tok_eval.eval_values(rows)
    assert values["tok/vs_small/news"] == rows[0].relative_diff("Small")


def test_shard_sample_takes_whole_documents_up_to_the_budget(corpus):
    first = next(dataset.iter_texts(corpus, "train"))
    assert tok_eval.shard_sample(corpus, "train", 10) == first[:10]
    sample = tok_eval.shard_sample(corpus, "val", 5_000)
    assert len(sample) <= 5_000 + 10  # joined by newlines
    assert sample.startswith(next(dataset.iter_texts(corpus, "val"))[:100])
