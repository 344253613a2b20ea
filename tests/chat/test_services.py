"""chat/services.py: the checkpoint picker and what each action does to the database."""

import pytest

from chat import services
from chat.limits import FieldError, Limits
from chat.models import Conversation, Message
from chat.protocol import Final
from runs.models import Checkpoint

pytestmark = pytest.mark.django_db

LIMITS = Limits()


def final(content="an answer", reason="stop") -> Final:
    return Final(content=content, parts=[], finish_reason=reason, prompt_tokens=7,
                 completion_tokens=3, time_to_first_token=0.1, tokens_per_second=50.0,
                 batch_rows=1)  # fmt: skip


@pytest.fixture
def model():
    return Checkpoint.objects.create(stage="sft", step=10, path="/ckpt/sft/d2")


def test_picker_lists_chat_models_first_then_newest(model):
    base = Checkpoint.objects.create(stage="base", step=100, path="/ckpt/base/d2")
    mid = Checkpoint.objects.create(stage="mid", step=50, path="/ckpt/mid/d2")
    rl = Checkpoint.objects.create(stage="rl", step=5, path="/ckpt/rl/d2")
    assert list(services.checkpoints_for_picker()) == [rl, model, mid, base]


def test_send_then_finish_saves_both_messages(alice, model):
    pending = services.begin_send(alice, None, model.pk, "What is  2+3?\n", LIMITS)
    conversation = Conversation.objects.get(pk=pending.conversation_id)
    assert conversation.title == "What is 2+3?"
    assert pending.messages == [{"role": "user", "content": "What is  2+3?\n"}]
    assert (pending.checkpoint_path, pending.step) == ("/ckpt/sft/d2", 10)
    request = pending.request(services.limits.sampling({}, LIMITS), seed=9)
    assert request.top_k == 50 and request.seed == 9 and request.messages == pending.messages

    reply = services.finish_reply(pending, final(), {"seed": 9})
    assert [m.role for m in conversation.messages.all()] == ["user", "assistant"]
    assert reply.sampling == {"seed": 9} and reply.tokens_per_second == 50.0
    conversation.refresh_from_db()
    assert conversation.checkpoint == model and conversation.checkpoint_step == 10


def test_abandoning_a_send_removes_its_message_and_new_conversation(alice, model):
    pending = services.begin_send(alice, None, model.pk, "hi", LIMITS)
    services.abandon_reply(pending)
    assert not Conversation.objects.exists() and not Message.objects.exists()


def test_a_send_after_an_unanswered_message_is_refused(alice, model):
    pending = services.begin_send(alice, None, model.pk, "hi", LIMITS)
    with pytest.raises(FieldError) as caught:
        services.begin_send(alice, pending.conversation_id, model.pk, "hello?", LIMITS)
    assert caught.value.field == "conversation"
    # Regenerating answers the waiting message instead.
    again = services.begin_regenerate(alice, pending.conversation_id, None)
    assert again.anchor_id == pending.anchor_id


def test_regenerate_uses_the_conversations_model_and_fails_cleanly_without_one(alice, model):
    pending = services.begin_send(alice, None, model.pk, "hi", LIMITS)
    services.finish_reply(pending, final(), {})
    again = services.begin_regenerate(alice, pending.conversation_id, None)
    assert again.checkpoint_id == model.pk and again.messages == pending.messages
    model.delete()
    with pytest.raises(FieldError) as caught:
        services.begin_regenerate(alice, pending.conversation_id, None)
    assert caught.value.field == "checkpoint"


def test_a_reply_whose_question_was_deleted_meanwhile_is_not_saved(alice, model):
    pending = services.begin_send(alice, None, model.pk, "hi", LIMITS)
    Message.objects.filter(pk=pending.anchor_id).delete()
    with pytest.raises(FieldError):
        services.finish_reply(pending, final(), {})
    assert not Message.objects.exists()


def test_a_reply_survives_its_checkpoint_being_deleted(alice, model):
    pending = services.begin_send(alice, None, model.pk, "hi", LIMITS)
    model.delete()
    services.finish_reply(pending, final(), {})
    conversation = Conversation.objects.get(pk=pending.conversation_id)
    assert conversation.checkpoint is None and conversation.checkpoint_step == 10
    assert conversation.messages.count() == 2
