"""OpenAI compatibility beyond the basics: n, stop, /v1/completions, logprobs, refusals, JSON
404/405, model aliases -- through the official `openai` client against daphne and the engine worker of
tests/chat/conftest.py (the fixtures of test_openai_api.py), and the stop matcher on its own.
"""

from __future__ import annotations

import openai
import pytest
import torch
from django.test import Client

from chat.stop import StopMatcher
from engine.checkpoint import load_model, load_tokenizer_for
from tests.chat.conftest import STEP
from tests.chat.test_openai_api import client, server, token  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


# ---- the stop matcher, with crafted pieces (no engine) ------------------------------------


def feed_all(matcher: StopMatcher, pieces: list[str]) -> list[str]:
    return [matcher.feed(piece) for piece in pieces]


def test_a_stop_string_split_over_pieces_is_found_and_never_shown():
    matcher = StopMatcher(["END"])
    assert feed_all(matcher, ["abcE", "N", "Dxyz", "more"]) == ["abc", "", "", ""]
    assert matcher.matched == "END" and matcher.text == "abc" and matcher.flush() == ""


def test_a_false_start_is_released_once_resolved():
    matcher = StopMatcher(["END", "\n\n"])
    assert feed_all(matcher, ["xE", "Nd", "\n", "y"]) == ["x", "ENd", "", "\ny"]
    assert matcher.matched is None
    assert matcher.feed("zE") == "z" and matcher.flush() == "E"
    assert matcher.text == "xENd\nyzE"


def test_the_earliest_stop_string_wins_and_a_match_inside_one_piece_too():
    matcher = StopMatcher(["world", "o w"])
    assert matcher.feed("hello world") == "hell"
    assert matcher.matched == "o w"
    matcher = StopMatcher(["\n"])
    assert feed_all(matcher, ["a", "b\nc"]) == ["a", "b"] and matcher.text == "ab"


def test_no_stop_strings_hold_nothing_back():
    matcher = StopMatcher([""])
    assert feed_all(matcher, ["a", "b"]) == ["a", "b"] and matcher.flush() == ""


# ---- through the API -------------------------------------------------------------------------


def ask(checkpoint, **extra) -> dict:
    return {
        "model": f"ckpt-{checkpoint.pk}",
        "messages": [{"role": "user", "content": "Hello there"}],
        **extra,
    }


def test_n_choices_come_from_one_request(client, checkpoint, engine):  # noqa: F811
    whole = client.chat.completions.create(
        **ask(checkpoint, n=3, max_tokens=8, temperature=1.0, seed=7)
    )
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert all(texts) and len(set(texts)) == 3  # each row its own seed
    assert {c.finish_reason for c in whole.choices} == {"length"}
    assert whole.usage.completion_tokens == 3 * 8
    # The prompt is counted once: its choices share the prefill.
    one = client.chat.completions.create(**ask(checkpoint, max_tokens=1))
    assert whole.usage.prompt_tokens == one.usage.prompt_tokens
    # Streamed, each chunk names its choice; each choice adds up to the same text.
    chunks = list(
        client.chat.completions.create(
            **ask(checkpoint, n=3, max_tokens=8, temperature=1.0, seed=7),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed, reasons = ["", "", ""], {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        streamed[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            reasons[choice.index] = choice.finish_reason
    assert streamed == texts and reasons == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage.completion_tokens == 3 * 8


def test_more_choices_than_the_worker_has_rows_is_a_400(client, checkpoint, engine):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as caught:  # the test worker has 4 rows
        client.chat.completions.create(**ask(checkpoint, n=5, max_tokens=1))
    assert caught.value.param == "n"


def test_stop_ends_the_reply_before_a_string_spanning_tokens(client, checkpoint, engine):  # noqa: F811
    tokenizer = load_tokenizer_for(checkpoint.path)
    longest = max(
        tokenizer.token_bytes()[: -len(tokenizer.special_tokens)].tolist()  # fmt: skip
    )
    base = ask(checkpoint, max_tokens=30, seed=11)
    text = client.chat.completions.create(**base).choices[0].message.content
    # Longer than any token: the stop string cannot be one token's text.
    stop = text[6 : 6 + longest + 1]
    assert len(stop) > longest and len(stop.encode()) > longest
    expected = text[: text.index(stop)]
    stopped = client.chat.completions.create(**base, stop=[stop, "\x01never"])
    (choice,) = stopped.choices
    assert choice.message.content == expected and choice.finish_reason == "stop"
    assert stopped.usage.completion_tokens < 30  # the row ended there
    chunks = list(client.chat.completions.create(**base, stop=stop, stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(deltas) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_continue_raw_text_on_a_base_checkpoint(client, checkpoint, engine):  # noqa: F811
    # The tiny model as a base checkpoint (the files say nothing of the stage).
    base = checkpoint
    base.stage = "base"
    base.save(update_fields=["stage"])
    tokenizer = load_tokenizer_for(base.path)
    prompt = "The quick brown fox"
    done = client.completions.create(
        model=f"ckpt-{base.pk}", prompt=prompt, max_tokens=6, echo=True, seed=3
    )
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    (choice,) = done.choices
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    assert choice.finish_reason == "length"
    # BOS and the text: no chat template.
    assert done.usage.prompt_tokens == 1 + len(tokenizer.encode(prompt))
    assert (
        done.usage.completion_tokens == 6
        and done.usage.total_tokens == done.usage.prompt_tokens + 6
    )
    # A list of prompts, n each: choices numbered prompt by prompt.
    many = client.completions.create(
        model=f"ckpt-{base.pk}", prompt=["One", "Two"], n=2, max_tokens=3, seed=3
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage.completion_tokens == 4 * 3
    # Streamed: the same text (same seed), echo first.
    chunks = list(
        client.completions.create(
            model=f"ckpt-{base.pk}", prompt=prompt, max_tokens=6, echo=True, seed=3, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_p": 0.9}, "top_p"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"12": 5}}, "logit_bias"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": 1}, "logprobs"),
        ({"n": 9}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_unsupported_parameters_are_a_400_naming_them(client, checkpoint, change, param):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**ask(checkpoint, **change))
    assert caught.value.param == param and caught.value.type == "invalid_request_error"


def test_completions_refuse_suffix_and_bad_logprobs(client, checkpoint):  # noqa: F811
    for change, param in (
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": 2, "echo": True}, "echo"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="latest", prompt="Hi", **change)
        assert caught.value.param == param
        assert param in caught.value.message or "not supported" in caught.value.message


# ---- logprobs: the model's log-softmax, checked against a direct forward -------------------


def direct_logprobs(checkpoint, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """(len(generated), vocab) log-softmax of the checkpoint's logits at each generated
    position, from one uncached forward over the prompt and the generated tokens."""
    model, _ = load_model(checkpoint.path, STEP)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated[:-1]]))[0]
    return torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 :]


def ids_by(tokenizer, key) -> dict:
    """Ordinary token ids by `key(bytes)`; asserts the key tells them apart."""
    ordinary = range(tokenizer.vocab_size - len(tokenizer.special_tokens))
    found = {key(tokenizer.id_to_bytes(i)): i for i in ordinary}
    assert len(found) == len(ordinary)
    return found


def test_chat_logprobs_are_the_models_log_softmax(client, checkpoint, engine):  # noqa: F811
    tokenizer = load_tokenizer_for(checkpoint.path)
    request = ask(checkpoint, max_tokens=8, temperature=1.0, seed=5, logprobs=True,
                  top_logprobs=3)  # fmt: skip
    reply = client.chat.completions.create(**request)
    (choice,) = reply.choices
    entries = choice.logprobs.content
    assert len(entries) == 8 and all(len(entry.top_logprobs) == 3 for entry in entries)
    prompt = tokenizer.render_for_completion({"messages": request["messages"]})
    by_bytes = ids_by(tokenizer, bytes)
    generated = [by_bytes[bytes(entry.bytes)] for entry in entries]
    expected = direct_logprobs(checkpoint, prompt, generated)
    for entry, token_id, dist in zip(entries, generated, expected, strict=True):
        assert entry.logprob == pytest.approx(dist[token_id].item(), abs=1e-4)
        tops = [top.logprob for top in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert tops[0] == pytest.approx(dist.max().item(), abs=1e-4)
        assert bytes(entry.top_logprobs[0].bytes) == tokenizer.id_to_bytes(int(dist.argmax()))
    assert tokenizer.decode(generated) == choice.message.content
    # Streamed: every piece of text comes with its tokens' entries, the same ones.
    chunks = list(client.chat.completions.create(**request, stream=True))
    pieces = [c.choices[0] for c in chunks if c.choices[0].delta.content]
    assert pieces and all(piece.logprobs.content for piece in pieces)
    streamed = [entry for piece in pieces for entry in piece.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]


def test_completion_logprobs_in_the_legacy_shape_and_cut_at_a_stop(client, checkpoint, engine):  # noqa: F811
    tokenizer = load_tokenizer_for(checkpoint.path)
    request = {"model": f"ckpt-{checkpoint.pk}", "prompt": "The quick", "max_tokens": 10,
               "seed": 2, "logprobs": 2}  # fmt: skip
    (choice,) = client.completions.create(**request).choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 10
    prompt = tokenizer.encode("The quick", prepend=tokenizer.get_bos_token_id())
    by_text = ids_by(tokenizer, lambda raw: raw.decode("utf-8", "backslashreplace"))
    generated = [by_text[text] for text in lp.tokens]
    expected = direct_logprobs(checkpoint, prompt, generated)
    rows = zip(lp.tokens, lp.token_logprobs, generated, lp.top_logprobs, expected, strict=True)
    for text, value, token_id, top, dist in rows:
        assert value == pytest.approx(dist[token_id].item(), abs=1e-4)
        # The 2 most likely, and the chosen token among them (so 2 or 3 of them).
        likeliest = {tokenizer.id_to_bytes(i).decode("utf-8", "backslashreplace")
                     for i in dist.topk(2).indices.tolist()}  # fmt: skip
        assert set(top) >= likeliest and len(top) <= 3 and top[text] == value
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # A stop string inside the text: the tokens starting at or after the cut are dropped.
    stop = choice.text[len(choice.text) // 2 :][:3]
    cut = client.completions.create(**request, stop=stop).choices[0]
    assert cut.text == choice.text[: choice.text.index(stop)]
    kept = cut.logprobs.text_offset
    assert kept == lp.text_offset[: len(kept)] and all(offset < len(cut.text) for offset in kept)
    assert len(kept) == sum(offset < len(cut.text) for offset in lp.text_offset)
    # Streamed: each chunk's entries, absolute offsets, add up to the whole.
    chunks = list(client.completions.create(**request, stream=True))
    offsets = [
        o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    assert offsets == lp.text_offset


def test_neutral_values_and_metadata_are_accepted(client, checkpoint, engine):  # noqa: F811
    reply = client.chat.completions.create(
        **ask(checkpoint, max_completion_tokens=2),
        user="someone",
        response_format={"type": "text"},
        top_p=1,
        presence_penalty=0,
        n=1,
        stop=[],
    )
    assert reply.usage.completion_tokens == 2


# ---- in-process: no engine needed ---------------------------------------------------------


def test_unknown_paths_and_wrong_methods_answer_json(alice, token):  # noqa: F811
    api = Client(headers={"Authorization": f"Bearer {token.key}"})
    for path in ("/v1/nope", "/v1/chat/nope", "/v1/"):
        response = api.get(path)
        assert response.status_code == 404 and response["Content-Type"] == "application/json"
        assert response.json()["error"]["code"] == "unknown_path"
    embeddings = api.post("/v1/embeddings", {"input": "x"}, content_type="application/json")
    assert embeddings.status_code == 404 and "embeddings" in embeddings.json()["error"]["message"]
    wrong = api.delete("/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert api.post("/v1/models").status_code == 405


def test_the_models_list_has_the_aliases(alice, token, checkpoint, tiny_checkpoint_dir):  # noqa: F811
    from runs.models import Checkpoint

    base = Checkpoint.objects.create(stage="base", step=STEP + 1, path=str(tiny_checkpoint_dir))
    api = Client(headers={"Authorization": f"Bearer {token.key}"})
    listed = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert listed["latest"]["alias_of"] == f"ckpt-{checkpoint.pk}"
    assert listed["latest-sft"]["alias_of"] == f"ckpt-{checkpoint.pk}"
    assert listed["latest-base"]["alias_of"] == f"ckpt-{base.pk}"
    assert "alias_of" not in listed[f"ckpt-{base.pk}"]
    detail = api.get("/v1/models/latest-base").json()
    assert detail["id"] == "latest-base" and detail["alias_of"] == f"ckpt-{base.pk}"
