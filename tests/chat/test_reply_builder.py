"""chat/reply.py: generated ids -> streamed (part, text) pieces and the message's parts."""

import pytest

from chat.reply import ReplyBuilder
from tests.chat.conftest import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def feed_all(builder, ids):
    pieces = []
    for token in ids:
        pieces += builder.feed(token)
    return pieces + builder.finish()


def test_plain_text_streams_as_text_and_stops_are_silent(tokenizer):
    ids = tokenizer.encode("Hello! How are you today?")
    builder = ReplyBuilder(tokenizer)
    end = tokenizer.encode_special("<|assistant_end|>")
    pieces = feed_all(builder, [*ids, end])
    assert {part for part, _ in pieces} == {"text"}
    assert "".join(text for _, text in pieces) == "Hello! How are you today?"
    assert builder.content == "Hello! How are you today?"
    assert builder.parts == []


def test_a_tool_call_becomes_parts(tokenizer):
    special = tokenizer.encode_special
    ids = [
        *tokenizer.encode("Let me compute."),
        special("<|python_start|>"), *tokenizer.encode("12*34"), special("<|python_end|>"),
        special("<|output_start|>"), *tokenizer.encode("408"), special("<|output_end|>"),
        *tokenizer.encode(" It is 408."),
        special("<|assistant_end|>"),
    ]  # fmt: skip
    builder = ReplyBuilder(tokenizer)
    pieces = feed_all(builder, ids)
    assert builder.parts == [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "12*34"},
        {"type": "python_output", "text": "408"},
        {"type": "text", "text": " It is 408."},
    ]
    assert builder.content == "Let me compute. It is 408."
    by_part = {}
    for part, text in pieces:
        by_part[part] = by_part.get(part, "") + text
    assert by_part == {"text": "Let me compute. It is 408.", "python": "12*34",
                       "python_output": "408"}  # fmt: skip


def test_a_character_split_across_tokens_is_never_sent_half_done(tokenizer):
    ids = tokenizer.encode("café ☕ ok")
    assert len(ids) > len("café ☕ ok") - 4  # byte-level: the accents span several ids
    builder = ReplyBuilder(tokenizer)
    pieces = feed_all(builder, ids)
    assert all("\ufffd" not in text for _, text in pieces)
    assert "".join(text for _, text in pieces) == "café ☕ ok" == builder.content


def test_nul_bytes_are_dropped(tokenizer):
    nul = tokenizer.encode("a\x00b")
    assert "\x00" in tokenizer.decode(nul)
    builder = ReplyBuilder(tokenizer)
    pieces = feed_all(builder, nul)
    assert "".join(text for _, text in pieces) == "ab" == builder.content
