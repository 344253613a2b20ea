"""engine.streaming: token-by-token text that never shows half a character."""

import pytest

from engine.streaming import MAX_WINDOW, REPLACEMENT, StreamDecoder
from engine.tokenizer import Tokenizer

TEXTS = [
    "plain ascii text, nothing special",
    "emoji 😀🎉🚀 in a row, and one 👩‍💻 joined",
    "한국어 문장도 잘 나와야 합니다. 감사합니다!",
    "mixed: café, naïve, 日本語, Ελληνικά, 🙂 end",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "안녕하세요, 세계! 오늘 날씨가 좋네요.",
    "emoji 😀🎉🚀 and more 😀😀 and text",
    "café naïve 日本語 Ελληνικά",
]


@pytest.fixture(scope="module")
def byte_tokenizer():
    """No merges at all: every multi-byte character is split across tokens."""
    return Tokenizer.train(CORPUS, vocab_size=265)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """With merges, whose tokens can also end or start in the middle of a character."""
    return Tokenizer.train(CORPUS * 10, vocab_size=330)


class CountingTokenizer:
    """A real tokenizer that records how many ids each decode call was given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sizes = []

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.tokenizer.decode(ids)


def stream(tokenizer, ids):
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.feed(token) for token in ids]
    return deltas, decoder.flush()


@pytest.mark.parametrize("which", ["byte_tokenizer", "bpe_tokenizer"])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_never_hold_half_a_character_and_add_up_to_the_text(request, which, text):
    tokenizer = request.getfixturevalue(which)
    ids = tokenizer.encode(text)
    deltas, tail = stream(tokenizer, ids)
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) + tail == tokenizer.decode(ids) == text
    assert tail == ""


def test_a_split_character_is_held_until_it_completes(byte_tokenizer):
    ids = byte_tokenizer.encode("a한")
    assert len(ids) == 4  # "a" + the three UTF-8 bytes of 한
    decoder = StreamDecoder(byte_tokenizer)
    assert [decoder.feed(token) for token in ids] == ["a", "", "", "한"]


def test_flush_releases_an_incomplete_character(byte_tokenizer):
    ids = byte_tokenizer.encode("x😀")[:-1]  # the emoji's last byte never comes
    decoder = StreamDecoder(byte_tokenizer)
    assert "".join(decoder.feed(token) for token in ids) == "x"
    assert decoder.flush() == REPLACEMENT
    assert decoder.flush() == ""


def test_a_genuine_replacement_character_is_released_by_the_next_token(byte_tokenizer):
    text = f"a{REPLACEMENT}b"
    deltas, tail = stream(byte_tokenizer, byte_tokenizer.encode(text))
    assert "".join(deltas) + tail == text
    assert deltas[-1] == f"{REPLACEMENT}b"


def test_special_tokens_stream_as_their_names(bpe_tokenizer):
    ids = [*bpe_tokenizer.encode("hi"), bpe_tokenizer.encode_special("<|assistant_end|>")]
    deltas, tail = stream(bpe_tokenizer, ids)
    assert "".join(deltas) + tail == "hi<|assistant_end|>"


def test_each_call_decodes_a_small_window_not_the_whole_text(bpe_tokenizer):
    ids = bpe_tokenizer.encode(" ".join(TEXTS) * 20)
    counting = CountingTokenizer(bpe_tokenizer)
    deltas, tail = stream(counting, ids)
    assert "".join(deltas) + tail == bpe_tokenizer.decode(ids)
    assert len(ids) > 1000 and max(counting.sizes) <= 8


def test_a_run_of_never_completing_bytes_is_bounded(byte_tokenizer):
    # Lead bytes of four-byte characters, never continued: every prefix ends in U+FFFD.
    lead = byte_tokenizer.encode("😀")[0]
    ids = [lead] * (3 * MAX_WINDOW)
    counting = CountingTokenizer(byte_tokenizer)
    deltas, tail = stream(counting, ids)
    assert "".join(deltas) + tail == byte_tokenizer.decode(ids)
    assert max(counting.sizes) <= MAX_WINDOW
