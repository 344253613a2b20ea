"""A chat that fits its model: older turns left out of the prompt, max tokens capped by what
the context leaves, the system prompt kept, completion mode's raw document."""

import pytest

from chat import limits, services
from chat.context import Window, fit
from chat.limits import FieldError, Limits
from chat.models import Conversation
from chat.protocol import Final
from engine.checkpoint import load_tokenizer_for
from runs.models import Checkpoint
from tests.chat.conftest import SMALL_CONTEXT, STEP, frames_until, open_socket, run

LIMITS = Limits()
ROOM = SMALL_CONTEXT // 2  # kept for the reply when older turns go


def final(content="It is 408. It is 408. It is 408.") -> Final:
    return Final(content=content, parts=[], finish_reason="length", prompt_tokens=1,
                 completion_tokens=1, time_to_first_token=0.1, tokens_per_second=9.0,
                 batch_rows=1)  # fmt: skip


@pytest.fixture
def small(small_checkpoint_dir):
    # No model_config on the row: the context length comes from the step's meta file.
    return Checkpoint.objects.create(stage="base", step=STEP, path=str(small_checkpoint_dir))


@pytest.fixture
def tokenizer(small_checkpoint_dir):
    return load_tokenizer_for(small_checkpoint_dir)


# ---- the rule, on made-up lengths ------------------------------------------------------------


def test_fit_keeps_all_turns_while_the_reply_keeps_its_room():
    lengths = {0: 60, 2: 40, 4: 10}  # prompt tokens when the model sees messages[i:]
    assert fit([0, 2, 4], lengths.get, 128, 64) == Window(start=0, prompt_tokens=60, max_tokens=64)


def test_fit_drops_whole_old_turns_and_caps_max_tokens_by_what_is_left():
    lengths = {0: 100, 2: 70, 4: 30}
    assert fit([0, 2, 4], lengths.get, 128, 4096) == Window(4, 30, 98)
    # A short reply keeps more history.
    assert fit([0, 2, 4], lengths.get, 128, 20) == Window(0, 100, 20)


def test_only_a_last_message_that_reaches_the_context_is_an_error():
    assert fit([0, 2], {0: 300, 2: 100}.get, 128, 64) == Window(2, 100, 28)
    with pytest.raises(FieldError) as caught:
        fit([0, 2], {0: 300, 2: 128}.get, 128, 64)
    assert caught.value.field == "content"
    assert "128 tokens long" in caught.value.message and "at most 128" in caught.value.message


# ---- the services, with the checkpoint's real tokenizer ------------------------------------


@pytest.mark.django_db
def test_a_long_chat_leaves_out_its_oldest_turns_but_keeps_the_system_and_last(
    alice, small, tokenizer
):
    conversation = Conversation.objects.create(owner=alice, checkpoint=small,
                                               system_prompt="Be brief.")  # fmt: skip
    for i in range(6):
        conversation.messages.create(role="user", content=f"Question {i}: what is 12*34?")
        conversation.messages.create(role="assistant", content=final().content)
    sampling = limits.sampling({"max_tokens": 4096}, LIMITS)
    pending = services.begin_send(alice, conversation.pk, small.pk, "And 2+3?", LIMITS, sampling)

    prompt = pending.messages
    assert prompt[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in prompt[1:]] == ["user", "assistant"] * ((len(prompt) - 2) // 2) + [
        "user"
    ]
    assert prompt[-1] == {"role": "user", "content": "And 2+3?"}
    stored = list(conversation.messages.all())
    first_seen = next(m for m in stored if m.pk == pending.context_start_id)
    assert first_seen.role == "user" and first_seen.pk != stored[0].pk
    assert prompt[1]["content"] == first_seen.content
    used = len(tokenizer.render_for_completion({"messages": prompt}))
    assert used <= SMALL_CONTEXT - ROOM
    # One more turn would not have left the reply its room.
    earlier = stored[stored.index(first_seen) - 2 :]
    wider = [{"role": "system", "content": "Be brief."}, *(m.as_chat() for m in earlier)]
    assert len(tokenizer.render_for_completion({"messages": wider})) > SMALL_CONTEXT - ROOM
    # max_tokens: what the context leaves.
    assert pending.fitted(sampling).max_tokens == SMALL_CONTEXT - used == pending.reply_room
    assert pending.request(sampling, seed=1).max_tokens == SMALL_CONTEXT - used

    reply = services.finish_reply(pending, final(), {})
    assert reply.context_start_id == first_seen.pk


@pytest.mark.django_db
def test_a_message_too_long_for_the_model_is_refused_and_nothing_is_saved(alice, small):
    with pytest.raises(FieldError) as caught:
        services.begin_send(alice, None, small.pk, "fox " * 300, LIMITS)
    assert caught.value.field == "content"
    assert f"at most {SMALL_CONTEXT} tokens" in caught.value.message
    assert not Conversation.objects.exists()


@pytest.mark.django_db
def test_the_system_prompt_is_stored_bounded_and_only_the_owners_to_change(alice, bob, small):
    pending = services.begin_send(alice, None, small.pk, "hi", LIMITS, system="You are terse.")
    conversation = Conversation.objects.get(pk=pending.conversation_id)
    assert conversation.system_prompt == "You are terse." and conversation.mode == "chat"
    assert pending.messages == [{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "hi"}]  # fmt: skip
    services.finish_reply(pending, final(), {})

    again = services.begin_regenerate(alice, conversation.pk, None, system="")
    assert again.messages == [{"role": "user", "content": "hi"}]
    conversation.refresh_from_db()
    assert conversation.system_prompt == ""

    with pytest.raises(FieldError) as caught:
        services.begin_regenerate(bob, conversation.pk, None, system="Obey bob.")
    assert caught.value.field == "conversation"
    conversation.refresh_from_db()
    assert conversation.system_prompt == ""

    with pytest.raises(FieldError) as caught:
        limits.system_prompt({"system": "x" * (LIMITS.max_system_chars + 1)}, LIMITS)
    assert caught.value.field == "system" and str(LIMITS.max_system_chars) in caught.value.message
    with pytest.raises(FieldError) as caught:
        limits.mode({"mode": "poem"})
    assert caught.value.field == "mode"


@pytest.mark.django_db
def test_completion_mode_continues_the_whole_document_and_keeps_its_mode(alice, small):
    first = services.begin_send(alice, None, small.pk, "The quick brown", LIMITS,
                                mode="completion", system="ignored in completion mode")  # fmt: skip
    assert first.messages == [] and first.prompt == "The quick brown"
    services.finish_reply(first, final(" fox jumps"), {})
    second = services.begin_send(alice, first.conversation_id, small.pk, " over the", LIMITS)
    assert second.prompt == "The quick brown fox jumps over the"
    services.finish_reply(second, final(" lazy dog"), {})
    with pytest.raises(FieldError) as caught:
        services.begin_send(alice, first.conversation_id, small.pk, "Hi", LIMITS, mode="chat")
    assert caught.value.field == "mode"


# ---- through the socket and a real engine worker -----------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_demo_sized_chat_keeps_answering_past_its_context(alice, small, tokenizer, engine):
    """Default max tokens, a system prompt, and more exchanges than the context holds."""

    async def body():
        socket = await open_socket(alice)
        frame = {"type": "send", "checkpoint": small.pk, "max_tokens": ROOM,
                 "system": "Answer in one line."}  # fmt: skip
        conversation, finals = None, []
        for i in range(4):
            await socket.send_json_to({**frame, "conversation": conversation,
                                       "content": f"Tell me about foxes, part {i}."})  # fmt: skip
            frames = await frames_until(socket, "done", "error")
            finals.append((frames[0], frames[-1]))
            conversation = frames[0]["conversation"]
        await socket.disconnect()
        return finals

    finals = run(body)
    assert [done["type"] for _, done in finals] == ["done"] * 4, finals[-1]
    started, done = finals[0]
    system_and_first = [{"role": "system", "content": "Answer in one line."},
                        {"role": "user", "content": "Tell me about foxes, part 0."}]  # fmt: skip
    rendered = tokenizer.render_for_completion({"messages": system_and_first})
    assert done["prompt_tokens"] == len(rendered)  # the system prompt was in the prompt
    assert started["context_start"] is None and done["completion_tokens"] == ROOM
    later = [(s, d) for s, d in finals[1:] if d["context_start"] is not None]
    assert later, "the chat never outgrew the model's context"
    for started, done in finals:
        assert done["prompt_tokens"] + done["completion_tokens"] <= SMALL_CONTEXT
        assert started["context_start"] == done["context_start"]


@pytest.mark.django_db(transaction=True)
def test_completion_mode_on_a_base_model_continues_the_raw_text(alice, small, tokenizer, engine):
    text = "The quick brown fox jumps over"

    async def body():
        socket = await open_socket(alice)
        await socket.send_json_to({"type": "send", "conversation": None, "checkpoint": small.pk,
                                   "mode": "completion", "content": text, "max_tokens": 4096})  # fmt: skip
        frames = await frames_until(socket, "done", "error")
        await socket.disconnect()
        return frames

    started, *tokens, done = run(body)
    assert done["type"] == "done", done
    raw = tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())
    assert done["prompt_tokens"] == len(raw)  # no chat template around it
    # max_tokens 4096 on a 128-token model: capped by what the context leaves.
    assert started["max_tokens"] == done["completion_tokens"] == SMALL_CONTEXT - len(raw)
    conversation = Conversation.objects.get(pk=started["conversation"])
    user, reply = conversation.messages.all()
    assert conversation.mode == "completion" and user.content == text
    assert reply.content == done["content"] == "".join(t["text"] for t in tokens)
    assert reply.sampling["max_tokens"] == SMALL_CONTEXT - len(raw)
