"""The chat page and its JSON reads: login, ownership, the picker and what the page carries."""

import json
import re

import pytest
from django.urls import reverse

from chat.models import Conversation, Message
from engine.models.gpt import GPTConfig, count_params
from runs.models import Checkpoint, EvalResult, Run, RunEvent

pytestmark = pytest.mark.django_db


D20 = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10,
                n_embd=1280)  # fmt: skip


@pytest.fixture
def models():
    """A base, an SFT and an RL checkpoint, created in that order (the base one is newest
    by id but must come last in the picker). The SFT one knows its model config."""
    sft = Checkpoint.objects.create(
        stage="sft", step=650, path="/ckpt/sft_checkpoints/d20", model_config=D20.to_dict()
    )
    rl = Checkpoint.objects.create(stage="rl", step=40, path="/ckpt/rl_checkpoints/d20")
    base = Checkpoint.objects.create(stage="base", step=9000, path="/ckpt/base_checkpoints/d20")
    return {"sft": sft, "rl": rl, "base": base}


def talk(owner, title, checkpoint=None, messages=()):
    conversation = Conversation.objects.create(owner=owner, title=title, checkpoint=checkpoint)
    for role, content in messages:
        conversation.messages.create(role=role, content=content)
    return conversation


def page_state(response) -> dict:
    return state_in(response.content.decode())


def state_in(html: str) -> dict:
    """The JSON the page hands its script (json_script escapes it inside the HTML)."""
    match = re.search(r'<script id="chat-state" type="application/json">(.*?)</script>', html)
    assert match, "the page carries no chat-state"
    return json.loads(match.group(1))


def test_the_chat_page_requires_login(client, alice):
    conversation = talk(alice, "mine")
    for url in (reverse("chat-page"), reverse("chat-conversation", args=[conversation.pk])):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))


def test_the_json_reads_refuse_anonymous_users(client, alice):
    conversation = talk(alice, "mine")
    urls = (
        reverse("chat-conversations-json"),
        reverse("chat-conversation-json", args=[conversation.pk]),
    )
    for url in urls:
        response = client.get(url)
        assert response.status_code == 403
        assert "conversations" not in response.json() and "messages" not in response.json()


def test_lists_only_own_conversations_most_recently_used_first(client, alice, bob):
    older = talk(alice, "Older talk")
    newer = talk(alice, "Newer talk")
    talk(bob, "Bob's secret plans")
    older.save()  # touched last: the most recently used
    client.force_login(alice)

    html = client.get(reverse("chat-page")).content.decode()
    assert "Bob&#x27;s secret plans" not in html and "Bob's secret plans" not in html
    assert html.index("Older talk") < html.index("Newer talk")

    listed = client.get(reverse("chat-conversations-json")).json()["conversations"]
    assert [c["id"] for c in listed] == [older.pk, newer.pk]
    assert listed[0]["url"] == reverse("chat-conversation", args=[older.pk])


def test_another_users_conversation_is_a_404(client, alice, bob):
    theirs = talk(bob, "Bob's", messages=[("user", "bob's private question")])
    client.force_login(alice)
    page = client.get(reverse("chat-conversation", args=[theirs.pk]))
    assert page.status_code == 404
    assert b"private question" not in page.content
    data = client.get(reverse("chat-conversation-json", args=[theirs.pk]))
    assert data.status_code == 404 and data.json() == {"detail": "no such conversation"}
    assert client.get(reverse("chat-conversation", args=[999999])).status_code == 404


def test_picker_lists_chat_models_first(client, alice, models):
    client.force_login(alice)
    response = client.get(reverse("chat-page"))
    html = response.content.decode()
    options = re.findall(r'<option value="(\d+)"( selected)?>([^<]*)</option>', html)
    assert [int(value) for value, _, _ in options] == [
        models["rl"].pk,
        models["sft"].pk,
        models["base"].pk,
    ]
    assert options[0][1] == " selected"  # a new conversation starts on the best model
    # One style for every checkpoint, the model named from its config, not its folder.
    assert options[1][2] == "SFT · nanochat GPT d20 · step 650"
    assert options[2][2] == "BASE · nanochat GPT · step 9000"  # no config: no depth
    state = page_state(response)
    assert [c["id"] for c in state["checkpoints"]] == [int(v) for v, _, _ in options]
    assert state["checkpoint"] == models["rl"].pk and state["conversation"] is None


def test_each_model_has_a_card_and_tiny_ones_say_what_to_expect(client, alice, models):
    tiny = GPTConfig(sequence_len=256, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2,
                     n_embd=256)  # fmt: skip
    demo = Checkpoint.objects.create(stage="base", step=250, path="/ckpt/base/d4",
                                     model_config=tiny.to_dict(), val_bpb=2.345678)  # fmt: skip
    client.force_login(alice)
    response = client.get(reverse("chat-page"))
    html = response.content.decode()

    def card(checkpoint):
        match = re.search(rf'<section class="model-card" data-checkpoint="{checkpoint.pk}"'
                          rf"(.*?)</section>", html, re.S)  # fmt: skip
        assert match, f"no card for checkpoint {checkpoint.pk}"
        rows = re.findall(r'data-key="([^"]+)" data-value="([^"]*)"><dt>[^<]*</dt><dd>([^<]*)',
                          match.group(1))  # fmt: skip
        return {key: (value, text) for key, value, text in rows}, match.group(1)

    rows, text = card(models["sft"])
    assert rows["parameters"] == (str(count_params(D20)["total"]), "1.4B")
    assert rows["context"] == ("2048", "2,048 tokens") and rows["step"][0] == "650"
    assert rows["family"][1] == "nanochat GPT" and rows["stage"][1] == "SFT"
    assert "nonsense" not in text
    rows, text = card(demo)
    assert rows["parameters"][0] == str(count_params(tiny)["total"])
    assert rows["val_bpb"][1] == "2.346"
    assert "tiny model" in text and "fluent-looking nonsense" in text
    assert "Completion mode" in text  # a base model says how to use it
    contexts = {c["id"]: c["context"] for c in page_state(response)["checkpoints"]}
    assert contexts[demo.pk] == 256 and contexts[models["rl"].pk] is None


def test_a_fine_tunes_card_counts_its_parents_tokens_and_shows_its_scores(client, alice):
    def trained(kind, parent, batch, step, stage):
        run = Run.objects.create(kind=kind, parent_checkpoint=parent)
        RunEvent.objects.create(run=run, seq=0, type="start", time=0.0,
                                data={"derived": {"total_batch_size": batch}})  # fmt: skip
        return Checkpoint.objects.create(run=run, stage=stage, step=step, path=f"/c/{stage}/d20",
                                         model_config=D20.to_dict())  # fmt: skip

    base = trained("base", None, 524288, 2000, "base")  # 1.05B tokens
    sft = trained("sft", base, 65536, 100, "sft")  # 6.55M more
    EvalResult.objects.create(run=sft.run, checkpoint=sft, task="ChatCORE", metric="centered",
                              value=0.123456)  # fmt: skip
    client.force_login(alice)
    html = client.get(reverse("chat-page")).content.decode()
    card = re.search(rf'data-checkpoint="{sft.pk}"(.*?)</section>', html, re.S).group(1)
    assert f'data-value="{524288 * 2000 + 65536 * 100}"><dt>tokens trained</dt>' in card
    assert "<dd>1.06B (base 1.05B + sft 6.55M)</dd>" in card
    assert "<dt>ChatCORE</dt><dd>0.1235</dd>" in card and f"<dd>run {sft.run_id}</dd>" in card
    assert "nonsense" not in card  # 1.4B parameters trained on a billion tokens: no toy


def test_an_opened_conversation_brings_its_messages_and_model(client, alice, models):
    conversation = talk(alice, "Arithmetic", checkpoint=models["sft"])
    conversation.messages.create(role="user", content="What is 12*34?")
    reply = conversation.messages.create(
        role="assistant",
        content="It is 408.",
        parts=[
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": "It is 408."},
        ],
        completion_tokens=12,
        tokens_per_second=88.5,
        time_to_first_token=0.05,
        finish_reason=Message.Finish.STOP,
    )
    client.force_login(alice)
    response = client.get(reverse("chat-conversation", args=[conversation.pk]))
    assert response.status_code == 200
    assert b"<title>Arithmetic" in response.content

    state = page_state(response)
    assert state["checkpoint"] == models["sft"].pk  # the conversation's model stays selected
    opened = state["conversation"]
    assert opened["id"] == conversation.pk
    assert [(m["role"], m["content"]) for m in opened["messages"]] == [
        ("user", "What is 12*34?"),
        ("assistant", "It is 408."),
    ]
    last = opened["messages"][-1]
    assert last["id"] == reply.pk and last["parts"][0] == {"type": "python", "text": "12*34"}
    assert (last["completion_tokens"], last["tokens_per_second"]) == (12, 88.5)

    data = client.get(reverse("chat-conversation-json", args=[conversation.pk])).json()
    assert data["messages"] == opened["messages"]


def test_the_page_has_its_controls_and_limits(client, alice, models, settings):
    settings.CHAT_LIMITS = {**settings.CHAT_LIMITS, "default_temperature": 0.6}
    client.force_login(alice)
    response = client.get(reverse("chat-page"))
    html = response.content.decode()
    for needle in ('id="prompt"', 'id="send"', 'id="stop"', 'id="new-chat"', 'id="thread"'):
        assert needle in html, needle
    assert re.search(r'id="temperature"[^>]*value="0.6"', html)
    assert re.search(r'id="top_k"[^>]*max="200"[^>]*value="50"', html)
    assert re.search(r'id="max_tokens"[^>]*max="4096"[^>]*value="512"', html)
    assert 'type="module" src="/static/js/chat.js"' in html
    assert "cdn" not in html.lower() and "unpkg" not in html
    assert page_state(response)["limits"]["default_temperature"] == 0.6
    assert f'href="{reverse("chat-page")}">Chat</a>' in html  # the topbar link


def test_without_checkpoints_the_composer_is_off_and_says_why(client, alice):
    client.force_login(alice)
    html = client.get(reverse("chat-page")).content.decode()
    assert "No checkpoint to chat with yet" in html
    assert re.search(r'<textarea id="prompt"[^>]*disabled', html)
    assert re.search(r'<button type="submit" id="send" disabled', html)


def test_markup_in_a_message_cannot_break_out_of_the_page_data(client, alice):
    hostile = "</script><script>window.__pwned = 1</script>"
    conversation = talk(alice, hostile, messages=[("user", hostile)])
    client.force_login(alice)
    html = client.get(reverse("chat-conversation", args=[conversation.pk])).content.decode()
    assert "<script>window.__pwned" not in html
    assert state_in(html)["conversation"]["messages"][0]["content"] == hostile


def test_only_get_is_allowed(client, alice):
    client.force_login(alice)
    assert client.post(reverse("chat-page")).status_code == 405
    assert client.post(reverse("chat-conversations-json")).status_code == 405
