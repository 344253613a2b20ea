"""CustomJSON files and the shipped identity conversations."""

import json

import pytest

from training.tasks.base import MissingSplitError
from training.tasks.customjson import CustomJSON, load_conversations
from training.tasks.identity import IDENTITY_FILE, Identity

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_reads_both_line_shapes_skips_blank_lines_and_keeps_parts(tmp_path):
    parts = [{"type": "text", "text": "2+2 is "}, {"type": "python", "text": "2+2"},
             {"type": "python_output", "text": "4"}, {"type": "text", "text": "4."}]  # fmt: skip
    path = write_lines(tmp_path / "chat.jsonl", [
        json.dumps(GOOD),
        "",
        json.dumps(GOOD["messages"]),
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": parts}]}),
    ])  # fmt: skip
    task = CustomJSON(path)
    assert len(task) == 3
    assert task.name == "CustomJSON(chat.jsonl)"
    assert task[0] == GOOD and task[1] == GOOD
    assert task[2]["messages"][-1]["content"] == parts
    with pytest.raises(NotImplementedError, match="no grader"):
        task.evaluate(task[0], "hello")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps(GOOD), "{not json"], r":2: invalid JSON: Expecting property name"),
        (['"just a string"'], r":1: expected \{\"messages\": \[...\]\} or a list of messages, got str"),
        (['{"conversation": []}'], r":1: expected .* got dict with keys \['conversation'\]"),
        (['{"messages": []}'], r":1: a conversation must be a dict with a non-empty 'messages'"),
        ([json.dumps([{"role": "assistant", "content": "hi"}])],
         r":1: message 0 has role 'assistant' where 'user' was expected"),
        ([json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])],
         r":1: message 1 has role 'user' where 'assistant' was expected"),
        ([json.dumps([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}])],
         r":1: message 0 \(user\) content must be a str, got int"),
        ([json.dumps([{"role": "user", "content": "a"},
                      {"role": "assistant", "content": [{"type": "code", "text": "x"}]}])],
         r":1: message 1 part 0 has unknown type 'code'"),
        ([json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": []}])],
         r":1: message 1 \(assistant\) has an empty list of parts"),
        ([json.dumps([{"role": "user", "content": "a"}])],
         r":1: the last message must be the assistant's"),
        ([json.dumps([{"role": "user"}])], r":1: message 0 must be a dict with 'role' and 'content'"),
    ],
    ids=["invalid-json", "not-object", "no-messages-key", "empty-messages", "starts-with-assistant",
         "not-alternating", "user-content-not-str", "bad-part-type", "empty-parts",
         "ends-with-user", "missing-content"],
)  # fmt: skip
def test_bad_lines_give_one_line_naming_file_and_line(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message) as info:
        load_conversations(path)
    text = str(info.value)
    assert text.startswith(f"{path}:")
    assert "\n" not in text


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: conversation file not found"):
        CustomJSON(tmp_path / "nope.jsonl")
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=rf"^{empty}: no conversations$"):
        CustomJSON(empty)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=rf"^{binary}:2: not UTF-8 text"):
        CustomJSON(binary)


def test_identity_conversations_render_and_introduce_nanochat(tokenizer):
    task = Identity()
    assert task.name == "Identity"
    assert 35 <= len(task) <= 60
    text = " ".join(m["content"] for c in task for m in c["messages"])
    assert text.count("nanochat") >= 25
    for conversation in task:
        ids, mask = tokenizer.render_conversation(conversation)
        assert sum(mask) > 0
    assert IDENTITY_FILE.stat().st_size < 50_000
    with pytest.raises(MissingSplitError, match="Identity has no 'test' split"):
        Identity("test")
