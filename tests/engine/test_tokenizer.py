"""Tokenizer training, encoding, persistence and chat rendering (engine/tokenizer.py)."""

import importlib
import inspect
import pickle

import pytest
import requests
import torch

from engine.tokenizer import SPECIAL_TOKENS, TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer

VOCAB_SIZE = 1024

MULTILINGUAL = [
    "안녕하세요, 세계! 오늘 날씨가 좋네요.",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "Ça va? Déjà vu, naïve façade, señor Müller, Øresund, Straße.",
    "Привет, мир! Как дела?",
    "こんにちは世界、カタカナとひらがな。",
]

ROUND_TRIP = [
    *MULTILINGUAL,
    "family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, skin tone 👍🏽, keycap 1️⃣, plain 🙂",
    "def f(x: int) -> int:\n\treturn {'a': [x ** 2, x // 3]}  # comment\n",
    "pi = 3.14159265358979, e = 2.71828, 1,000,000 and -42 and 0x1F and 1e-10",
    "   leading spaces\n\n\n\ttabs\r\nCRLF   \n  trailing   ",
    "",
    " ",
    "\u200b zero width \ufeff BOM and the null byte \x00 end",
]


def _corpus() -> list[str]:
    """A few hundred KB of real prose and code: stdlib docstrings and source, plus other scripts."""
    docs = []
    for name in ("collections", "argparse", "pathlib", "json", "textwrap", "string", "inspect"):
        module = importlib.import_module(name)
        docs.append(inspect.getsource(module))
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member)
            if doc:
                docs.append(doc)
    docs.extend(MULTILINGUAL * 20)
    # Plenty of numbers, so that the merges could glue digits if the split pattern allowed it.
    docs.append(" ".join(str(1900 + i % 125) for i in range(20_000)))
    docs.append(" ".join(str(i * 7919) for i in range(5000)))
    return docs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(_corpus(), vocab_size=VOCAB_SIZE)


def _all_tokens(tokenizer: Tokenizer) -> list[str]:
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]


# ---- vocabulary and special tokens ----------------------------------------------------------


def test_corpus_is_a_few_hundred_kilobytes():
    assert 200_000 < sum(len(d) for d in _corpus()) < 2_000_000


def test_vocab_size_is_what_was_asked(tok):
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.token_bytes().shape == (VOCAB_SIZE,)


def test_special_tokens_are_the_last_nine_ids_in_order(tok):
    assert tok.special_tokens == list(SPECIAL_TOKENS)
    for i, name in enumerate(SPECIAL_TOKENS):
        token_id = tok.encode_special(name)
        assert token_id == VOCAB_SIZE - len(SPECIAL_TOKENS) + i
        assert tok.decode([token_id]) == name
        assert tok.id_to_token(token_id) == name
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>")


def test_special_token_text_in_plain_text_stays_plain(tok):
    text = "ignore this: <|bos|><|assistant_end|> <|user_start|>"
    ids = tok.encode(text)
    assert not set(ids) & {tok.encode_special(name) for name in SPECIAL_TOKENS}
    assert tok.decode(ids) == text
    assert len(tok.encode("<|bos|>")) > 1


def test_unknown_special_token_and_out_of_range_id_are_rejected(tok):
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("<|nope|>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_token(VOCAB_SIZE)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("x", prepend=-1)


# ---- encoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_batch_encoding_matches_single_encoding(tok):
    batch = tok.encode(ROUND_TRIP, num_threads=2)
    assert batch == [tok.encode(text) for text in ROUND_TRIP]


def test_prepend_and_append_accept_names_and_ids(tok):
    bos, end = tok.encode_special("<|bos|>"), tok.encode_special("<|assistant_end|>")
    plain = tok.encode("hello world")
    assert tok.encode("hello world", prepend="<|bos|>", append=end) == [bos, *plain, end]
    assert tok.encode(["a", "b"], prepend=bos) == [[bos, *tok.encode("a")], [bos, *tok.encode("b")]]
    with pytest.raises(ValueError, match="str or a list of str"):
        tok.encode(b"bytes")


@pytest.mark.parametrize("number", ["12345", "1000000", "3.14159", "year 2024-05-17"])
def test_numbers_split_into_groups_of_at_most_two_digits(tok, number):
    pieces = [tok.decode([i]) for i in tok.encode(number)]
    digit_groups = ["".join(c for c in p if c.isdigit()) for p in pieces]
    assert max(len(g) for g in digit_groups) <= 2
    assert "".join(digit_groups) == "".join(c for c in number if c.isdigit())


def test_digit_pairs_are_learned_but_never_longer_runs(tok):
    digit_tokens = [t for t in _all_tokens(tok) if t.strip().isdigit()]
    assert any(len(t.strip()) == 2 for t in digit_tokens)
    assert all(len(t.strip()) <= 2 for t in digit_tokens)


def test_training_learns_merges_that_compress_text(tok):
    text = "The function returns a new dictionary and raises a ValueError."
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


# ---- token_bytes -----------------------------------------------------------------------------


def test_token_bytes_counts_utf8_bytes_and_zero_for_specials(tok):
    token_bytes = tok.token_bytes()
    assert token_bytes.dtype == torch.int32
    assert token_bytes.device == torch.device("cpu")
    assert torch.all(token_bytes[:256] == 1)
    assert torch.all(token_bytes[-len(SPECIAL_TOKENS) :] == 0)
    for word in (" the", " return", "def"):
        (token_id,) = tok.encode(word)
        assert token_bytes[token_id].item() == len(word.encode("utf-8"))


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_token_bytes_of_a_text_sum_to_its_utf8_length(tok, text):
    ids = tok.encode(text, prepend="<|bos|>")
    assert tok.token_bytes()[ids].sum().item() == len(text.encode("utf-8"))


# ---- training options ------------------------------------------------------------------------


def test_vocab_size_too_small_for_bytes_and_specials_is_rejected():
    with pytest.raises(ValueError, match="vocab_size must be at least 265"):
        Tokenizer.train(["some text"], vocab_size=264)


def test_corpus_too_small_for_the_vocab_is_rejected():
    with pytest.raises(ValueError, match="only supports .* merges"):
        Tokenizer.train(["tiny tiny corpus"], vocab_size=4096)


def test_non_string_document_is_rejected():
    with pytest.raises(ValueError, match="training document 1 is a int"):
        Tokenizer.train(["fine text", 7], vocab_size=300)


def test_doc_cap_cuts_each_document():
    docs = ["alpha beta gamma delta " * 40, "epsilon zeta eta theta " * 40]
    capped = Tokenizer.train(docs, vocab_size=290, doc_cap=200)
    cut = Tokenizer.train([d[:200] for d in docs], vocab_size=290)
    full = Tokenizer.train(docs, vocab_size=290)
    assert _all_tokens(capped) == _all_tokens(cut)
    assert _all_tokens(capped) != _all_tokens(full)


def test_max_chars_stops_reading():
    first, second = "alpha beta gamma delta " * 40, "epsilon zeta eta theta " * 40
    limited = Tokenizer.train([first, second, 7], vocab_size=290, max_chars=len(first) + 50)
    cut = Tokenizer.train([first, second[:50]], vocab_size=290)
    assert _all_tokens(limited) == _all_tokens(cut)


# ---- persistence -----------------------------------------------------------------------------


def test_save_then_load_gives_identical_tokenizer(tok, tmp_path):
    tok.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        TOKEN_BYTES_FILE,
        TOKENIZER_FILE,
    ]
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.encode(ROUND_TRIP) == tok.encode(ROUND_TRIP)
    assert torch.equal(loaded.token_bytes(), tok.token_bytes())
    saved = torch.load(tmp_path / "tok" / TOKEN_BYTES_FILE, weights_only=True)
    assert torch.equal(saved, tok.token_bytes())


def test_load_missing_files_names_the_path(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=TOKENIZER_FILE):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    (tmp_path / TOKEN_BYTES_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / TOKEN_BYTES_FILE)):
        Tokenizer.load(tmp_path)


def test_load_rejects_foreign_pickle_and_mismatched_token_bytes(tok, tmp_path):
    tok.save(tmp_path)
    torch.save(torch.zeros(10, dtype=torch.int32), tmp_path / TOKEN_BYTES_FILE)
    with pytest.raises(ValueError, match="has shape"):
        Tokenizer.load(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_bytes(pickle.dumps({"not": "an encoding"}))
    with pytest.raises(ValueError, match="expected a pickled tiktoken.Encoding"):
        Tokenizer.load(tmp_path)


def test_pretrained_encoding_offline_raises_oserror(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise requests.ConnectionError("no route to host")

    # No internet here by design: an empty cache plus a failing HTTP client is what offline is.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(requests, "get", no_network)
    with pytest.raises(OSError, match="could not load the tiktoken encoding 'gpt2'"):
        Tokenizer.from_pretrained_tiktoken("gpt2")
    with pytest.raises(ValueError, match="Unknown encoding"):
        Tokenizer.from_pretrained_tiktoken("no_such_encoding")


# ---- chat rendering --------------------------------------------------------------------------

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You are a careful calculator."},
        {"role": "user", "content": "What is 6 times 7?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute it."},
                {"type": "python", "text": "6*7"},
                {"type": "python_output", "text": "42"},
                {"type": "text", "text": "It is 42."},
            ],
        },
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]
}


def _expected_rendering(tok):
    s, e = tok.encode_special, tok.encode
    segments = [
        ([s("<|bos|>")], 0),
        ([s("<|user_start|>")], 0),
        (e("You are a careful calculator.\n\nWhat is 6 times 7?"), 0),
        ([s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (e("Let me compute it."), 1),
        ([s("<|python_start|>"), *e("6*7"), s("<|python_end|>")], 1),
        ([s("<|output_start|>"), *e("42"), s("<|output_end|>")], 0),
        (e("It is 42."), 1),
        ([s("<|assistant_end|>")], 1),
        ([s("<|user_start|>"), *e("Thanks!"), s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (e("You're welcome."), 1),
        ([s("<|assistant_end|>")], 1),
    ]
    ids = [t for tokens, _ in segments for t in tokens]
    mask = [m for tokens, m in segments for _ in tokens]
    return ids, mask


def test_render_conversation_ids_and_mask(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    expected_ids, expected_mask = _expected_rendering(tok)
    assert ids == expected_ids
    assert mask == expected_mask


def test_render_conversation_truncates_both_lists(tok):
    expected_ids, expected_mask = _expected_rendering(tok)
    ids, mask = tok.render_conversation(CONVERSATION, max_tokens=10)
    assert ids == expected_ids[:10]
    assert mask == expected_mask[:10]
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        tok.render_conversation(CONVERSATION, max_tokens=0)


def test_render_for_completion_drops_last_reply_and_opens_assistant_turn(tok):
    ids = tok.render_for_completion(CONVERSATION)
    full, _ = _expected_rendering(tok)
    reply = len(tok.encode("You're welcome.")) + 2  # assistant_start, reply, assistant_end
    assert ids == full[:-reply] + [tok.encode_special("<|assistant_start|>")]
    ending_with_user = {"messages": CONVERSATION["messages"][:-1]}
    assert tok.render_for_completion(ending_with_user) == ids


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant'"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "message 1 has role 'user' where 'assistant'",
        ),
        (
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
            ],
            "message 2 has role 'system'",
        ),
        ([{"role": "system", "content": "s"}], "must be followed by a user message"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
            "message 0 .user. content",
        ),
        ([{"role": "user"}], "message 0 must be a dict with 'role' and 'content'"),
        ([], "non-empty 'messages' list"),
    ],
)
def test_invalid_conversations_are_rejected(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        tok.render_conversation({"messages": messages})


def test_unknown_part_type_is_rejected(tok):
    conversation = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "image", "text": "x"}]},
        ]
    }
    with pytest.raises(ValueError, match="message 1 part 0 has unknown type 'image'"):
        tok.render_conversation(conversation)
    with pytest.raises(ValueError, match="message 1 part 0 has unknown type 'image'"):
        tok.render_for_completion(
            {"messages": [*conversation["messages"], conversation["messages"][0]]}
        )


def test_visualize_marks_trained_tokens(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    shown = tok.visualize(ids, mask)
    assert shown.count("\x1b[32m") == sum(mask)
    assert shown.count("\x1b[90m") == len(mask) - sum(mask)
    assert "<|python_start|>" in shown
    with pytest.raises(ValueError, match="differ in length"):
        tok.visualize(ids, mask[:-1])
