"""SpellingBee and SimpleSpelling: per-index generation, answers, grading, word lists."""

import pytest

from engine.calculator import evaluate_expression
from training.tasks.gsm8k import extract_answer, message_text
from training.tasks.spelling import (
    BUILTIN_WORDS,
    TEST_SEED_OFFSET,
    SimpleSpelling,
    SpellingBee,
    load_words,
    spelled,
)


def test_builtin_word_list_is_a_few_thousand_plain_words():
    words = load_words()
    assert 1000 <= len(words) <= 5000
    assert words == sorted(set(words))
    assert all(w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 12 for w in words)
    assert {"function", "number", "value", "example", "simple"} <= set(words)
    assert BUILTIN_WORDS.stat().st_size < 100_000


def test_examples_depend_only_on_split_and_index():
    a, b = SpellingBee("train", size=50), SpellingBee("train", size=500)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    test = SpellingBee("test", size=50)
    assert test.seed(0) == TEST_SEED_OFFSET and a.seed(0) == 0
    assert [c["messages"][0]["content"] for c in test] != [c["messages"][0]["content"] for c in a]
    assert len(SpellingBee("train", size=50, start=10)) == 40


def test_spelling_bee_answer_counts_spells_and_calls_the_tool():
    task = SpellingBee("train", size=300)
    phrasings, absent = set(), 0
    for conversation in task:
        word, letter = conversation["word"], conversation["letter"]
        question = conversation["messages"][0]["content"]
        assert word in question and letter in question
        phrasings.add(question.replace(word, "W").replace(f"'{letter}'", "L"))
        parts = conversation["messages"][1]["content"]
        text = message_text(parts)
        assert spelled(word) in text
        call = next(p["text"] for p in parts if p["type"] == "python")
        output = next(p["text"] for p in parts if p["type"] == "python_output")
        assert call == f"'{word}'.count('{letter}')"
        assert evaluate_expression(call) == output == str(word.count(letter))
        assert extract_answer(text) == output
        assert task.evaluate(conversation, text)
        absent += word.count(letter) == 0
    assert len(phrasings) >= 6
    assert 0 < absent < 150  # the letter is sometimes not in the word at all


def test_spelling_bee_grading():
    task = SpellingBee("test", size=5)
    conversation = {"messages": [], "word": "strawberry", "letter": "r"}
    assert task.evaluate(conversation, "...so the count is 3.\n\n#### 3")
    assert not task.evaluate(conversation, "#### 2")
    assert not task.evaluate(conversation, "there are 3")
    assert task.reward(conversation, "#### 3") == 1.0


def test_simple_spelling(tokenizer):
    task = SimpleSpelling("train", size=20)
    conversation = task[3]
    word = conversation["word"]
    assert conversation["messages"][0]["content"] == f"Spell the word: {word}"
    assert conversation["messages"][1]["content"] == spelled(word)
    assert spelled("apple") == "apple:a,p,p,l,e"
    assert task.evaluate(conversation, spelled(word))
    assert task.evaluate(conversation, f" {word}: {', '.join(word)}")
    assert not task.evaluate(conversation, f"{word}:{','.join(word[::-1])}x")
    ids, mask = tokenizer.render_conversation(conversation)
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == spelled(word) + "<|assistant_end|>"


def test_bad_sizes_and_splits():
    with pytest.raises(ValueError, match="size must be a positive int"):
        SpellingBee("train", size=0)
    with pytest.raises(ValueError, match="SimpleSpelling has no 'val' split"):
        SimpleSpelling("val", size=3)


def test_hub_word_list_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    source = tmp_path / "words_alpha.txt"
    source.write_text("apple\r\nBanana\r\ncherry\r\nx1\r\n\r\n")
    monkeypatch.setattr("training.tasks.spelling.WORDS_URL", source.as_uri())
    cache = tmp_path / "cache"
    assert load_words("hub", cache) == ["apple", "cherry"]
    source.unlink()  # a second load needs no network
    assert load_words("hub", cache) == ["apple", "cherry"]
    task = SimpleSpelling("train", size=4, source="hub", cache_dir=cache)
    assert {c["word"] for c in task} <= {"apple", "cherry"}
    assert (cache / "words_alpha.txt").is_file()
