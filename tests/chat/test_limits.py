"""chat/limits.py: SPEC §12's limits as pure validation (no database, no engine)."""

import pytest

from chat import limits
from chat.limits import FieldError, Limits, Sampling

SPEC = Limits()


def field_of(call) -> str | None:
    with pytest.raises(FieldError) as caught:
        call()
    assert caught.value.message
    return caught.value.field


def test_spec_defaults_apply_when_fields_are_absent_or_null():
    assert limits.sampling({}, SPEC) == Sampling(temperature=0.8, top_k=50, max_tokens=512)
    nulls = {"temperature": None, "top_k": None, "max_tokens": None}
    assert limits.sampling(nulls, SPEC) == Sampling(0.8, 50, 512)


@pytest.mark.parametrize(
    "data",
    [
        {"temperature": 0, "top_k": 0, "max_tokens": 1},
        {"temperature": 2, "top_k": 200, "max_tokens": 4096},
        {"temperature": 1.25},
    ],
)
def test_the_ends_of_each_range_are_accepted(data):
    sampling = limits.sampling(data, SPEC)
    assert isinstance(sampling.temperature, float)
    for name, value in data.items():
        assert getattr(sampling, name) == value


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_k": 201}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 5.0}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4097}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
    ],
)
def test_out_of_range_sampling_names_the_field(data, field):
    assert field_of(lambda: limits.sampling(data, SPEC)) == field


def test_content_must_be_non_blank_text_within_the_per_message_limit():
    assert limits.content({"content": "x" * 8000}, SPEC) == "x" * 8000
    for bad in ["x" * 8001, "", " \n ", "a\x00b", None, 42, ["x"]]:
        assert field_of(lambda bad=bad: limits.content({"content": bad}, SPEC)) == "content"


def test_object_ids():
    assert limits.object_id({"conversation": 3}, "conversation", required=True) == 3
    assert limits.object_id({}, "conversation", required=False) is None
    for bad in [0, -2, "3", 1.0, True]:
        data = {"checkpoint": bad}
        assert field_of(lambda d=data: limits.object_id(d, "checkpoint", required=False)) == (
            "checkpoint"
        )
    assert field_of(lambda: limits.object_id({}, "checkpoint", required=True)) == "checkpoint"


def test_conversation_size():
    limits.conversation_size([8000] * 4, SPEC)
    limits.conversation_size([1] * 500, SPEC)
    assert field_of(lambda: limits.conversation_size([1] * 501, SPEC)) == "conversation"
    assert field_of(lambda: limits.conversation_size([8000] * 4 + [1], SPEC)) == "content"


def test_a_stateless_message_list_is_checked_message_by_message():
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
          {"role": "user", "content": "and?", "name": "ignored"}]  # fmt: skip
    assert limits.messages(ok, SPEC)[-1] == {"role": "user", "content": "and?"}
    cases = [
        ([], "messages"),
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "system", "content": "x"}], "messages[0].role"),
        ([{"role": "assistant", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": "a\x00"}], "messages[0].content"),
        ([{"role": "user", "content": "x" * 8001}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}] * 250
         + [{"role": "user", "content": "x"}], "conversation"),
        ([{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "x" * 8000}]
         * 2 + [{"role": "user", "content": "x"}], "content"),
    ]  # fmt: skip
    for value, field in cases:
        assert field_of(lambda v=value: limits.messages(v, SPEC)) == field, value


def test_limits_can_be_tightened():
    tight = Limits(max_message_chars=10, max_top_k=5, default_top_k=5)
    assert field_of(lambda: limits.content({"content": "x" * 11}, tight)) == "content"
    assert limits.sampling({}, tight).top_k == 5
    assert field_of(lambda: limits.sampling({"top_k": 6}, tight)) == "top_k"
