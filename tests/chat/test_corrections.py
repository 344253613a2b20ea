"""Corrections become data (chat/corrections.py): feedback, datasets, export, fine-tune submit.

No engine runs here: conversations are written to the database as a chat would leave them.
The export is read back by the SFT program's own loader (CustomJSON, the tokenizer's render
and the SFT packer), so "the corrected text is what is trained" is checked on real code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.test import APIClient

from chat import corrections
from chat.limits import FieldError
from chat.models import Conversation, ConversationDataset, Feedback, Message
from chat.services import chat_limits
from runs.models import Run
from tests.chat.conftest import tiny_tokenizer
from training.dataloader import sft_batches
from training.tasks.registry import parse_mixture

pytestmark = pytest.mark.django_db

ORIGINAL = "Paris is in Germany."
CORRECTED = "Paris is the capital of France."


def chat_with(user, checkpoint, *, system: str = "") -> Conversation:
    conversation = Conversation.objects.create(
        owner=user, checkpoint=checkpoint, checkpoint_step=checkpoint.step, system_prompt=system
    )
    conversation.messages.create(role="user", content="Where is Paris?")
    conversation.messages.create(role="assistant", content=ORIGINAL)
    return conversation


def reply_of(conversation) -> Message:
    return conversation.messages.filter(role="assistant").first()


def api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_a_correction_is_shown_kept_beside_the_original_and_undone_by_the_original(
    alice, checkpoint
):
    reply = reply_of(chat_with(alice, checkpoint))
    corrections.give_feedback(alice, reply.pk, correction=CORRECTED, lim=chat_limits())
    reply.refresh_from_db()
    assert reply.content == CORRECTED and reply.feedback.original_content == ORIGINAL
    # Correcting again keeps the model's text, not the first correction.
    corrections.give_feedback(alice, reply.pk, correction=CORRECTED + "!", lim=chat_limits())
    assert Feedback.objects.get(message=reply).original_content == ORIGINAL
    corrections.give_feedback(alice, reply.pk, correction=ORIGINAL, lim=chat_limits())
    reply.refresh_from_db()
    assert reply.content == ORIGINAL and not reply.feedback.corrected


def test_a_corrected_reply_is_exported_as_the_trained_tokens_of_the_sft_loader(
    alice, checkpoint, tmp_path
):
    conversation = chat_with(alice, checkpoint, system="Be brief.")
    response = api(alice).post(
        f"/api/chat/messages/{reply_of(conversation).pk}/feedback/",
        {"correction": CORRECTED, "rating": 1},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert response.json() == {"message": reply_of(conversation).pk, "content": CORRECTED,
                               "rating": 1, "corrected": True,
                               "original_content": ORIGINAL}  # fmt: skip
    dataset = corrections.create_dataset(alice, "my fixes")
    entry = corrections.add_conversation(alice, dataset.pk, conversation.pk)
    assert entry.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is Paris?"},
        {"role": "assistant", "content": CORRECTED},
    ]
    dataset.refresh_from_db()
    assert dataset.source_checkpoint == checkpoint  # the model the conversation was had with

    path = corrections.write_export(dataset)
    assert Path(settings.NANOCHAT_HOME).resolve() in path.resolve().parents
    download = api(alice).get(f"/api/chat/datasets/{dataset.pk}/export/")
    assert download.status_code == 200
    assert b"".join(download.streaming_content).decode() == path.read_text()

    # The SFT program's loader: the mixture entry, the chat template's mask, the packer.
    mixture = parse_mixture(f"customjson:{path}*3", "train")
    assert len(mixture) == 3
    tokenizer = tiny_tokenizer()
    ids, mask = tokenizer.render_conversation(mixture[0])
    trained = [i for i, m in zip(ids, mask, strict=True) if m == 1]
    assert tokenizer.decode(trained) == CORRECTED + "<|assistant_end|>"
    inputs, targets, _ = next(sft_batches(mixture, tokenizer, B=1, T=64, num_epochs=1))
    learned = [t for t in targets[0].tolist() if t != -1]
    assert tokenizer.decode(learned).startswith(CORRECTED + "<|assistant_end|>")


def test_only_good_replies_are_collected_and_a_rejected_reply_is_never_trained(alice, checkpoint):
    good = chat_with(alice, checkpoint)
    corrections.give_feedback(alice, reply_of(good).pk, rating=1, lim=chat_limits())
    unrated = chat_with(alice, checkpoint)
    rejected = chat_with(alice, checkpoint)
    rejected.messages.create(role="user", content="Sure?")
    later = rejected.messages.create(role="assistant", content="Yes.")
    corrections.give_feedback(alice, reply_of(rejected).pk, rating=-1, lim=chat_limits())
    corrections.give_feedback(alice, later.pk, rating=1, lim=chat_limits())
    dataset = corrections.create_dataset(alice, "collected", checkpoint.pk)
    entries = corrections.collect(alice, dataset.pk)
    assert [e.conversation_id for e in entries] == [good.pk]
    with pytest.raises(FieldError, match="no upvoted or corrected"):
        corrections.add_conversation(alice, dataset.pk, unrated.pk)
    with pytest.raises(FieldError, match="thumbs down"):
        corrections.add_conversation(alice, dataset.pk, rejected.pk)


def test_entries_are_edited_with_the_loaders_rules_and_removed(alice, checkpoint):
    conversation = chat_with(alice, checkpoint)
    corrections.give_feedback(alice, reply_of(conversation).pk, rating=1, lim=chat_limits())
    dataset = corrections.create_dataset(alice, "edits")
    entry = corrections.add_conversation(alice, dataset.pk, conversation.pk)
    url = f"/api/chat/datasets/{dataset.pk}/entries/{entry.pk}/"
    edited = [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "There."}]
    assert api(alice).patch(url, {"messages": edited}, format="json").status_code == 200
    entry.refresh_from_db()
    assert entry.messages == edited
    bad = api(alice).patch(url, {"messages": edited[:1]}, format="json")
    assert bad.status_code == 400 and "assistant" in bad.json()["messages"][0]
    too_long = [edited[0], {"role": "assistant", "content": "x" * 8001}]
    assert api(alice).patch(url, {"messages": too_long}, format="json").status_code == 400
    assert api(alice).delete(url).status_code == 204
    assert not dataset.entries.exists()


def test_bounded_inputs_names_and_corrections(alice, checkpoint):
    reply = reply_of(chat_with(alice, checkpoint))
    client = api(alice)
    url = f"/api/chat/messages/{reply.pk}/feedback/"
    long = client.post(url, {"correction": "x" * (chat_limits().max_message_chars + 1)},
                       format="json")  # fmt: skip
    assert long.status_code == 400 and "correction" in long.json()
    assert client.post(url, {"rating": 2}, format="json").status_code == 400
    for name in ("../etc", "a/b", "..", "", "tab\there", "x" * 101):
        response = client.post("/api/chat/datasets/", {"name": name}, format="json")
        assert response.status_code == 400, name
    assert client.post("/api/chat/datasets/", {"name": "ok"}, format="json").status_code == 201
    assert client.post("/api/chat/datasets/", {"name": "ok"}, format="json").status_code == 400


def test_fine_tune_submits_an_sft_run_from_the_checkpoint_with_the_export_upweighted(
    alice, checkpoint
):
    conversation = chat_with(alice, checkpoint)
    corrections.give_feedback(alice, reply_of(conversation).pk, correction=CORRECTED,
                              lim=chat_limits())  # fmt: skip
    dataset = corrections.create_dataset(alice, "to train", checkpoint.pk)
    corrections.add_conversation(alice, dataset.pk, conversation.pk)
    response = api(alice).post(f"/api/chat/datasets/{dataset.pk}/finetune/",
                               {"preset": "tiny"}, format="json")  # fmt: skip
    assert response.status_code == 201, response.content
    run = Run.objects.get(pk=response.json()["id"])
    assert run.kind == "sft" and run.parent_checkpoint == checkpoint and run.owner == alice
    export, _, rest = run.config["mixture"].partition(",")
    assert export.startswith("customjson:") and export.endswith("*3")
    assert rest == "smoltalk,mmlu_aux,gsm8k*2,identity*2,simple_spelling,spelling_bee"
    path = Path(export.removeprefix("customjson:").removesuffix("*3"))
    assert json.loads(path.read_text())["messages"][-1]["content"] == CORRECTED
    bad = api(alice).post(f"/api/chat/datasets/{dataset.pk}/finetune/", {"preset": "nope"},
                          format="json")  # fmt: skip
    assert bad.status_code == 400 and "preset" in bad.json()


def test_the_chat_page_button_collects_and_fine_tunes_the_chatted_checkpoint(
    client, alice, checkpoint
):
    conversation = chat_with(alice, checkpoint)
    corrections.give_feedback(alice, reply_of(conversation).pk, rating=1, lim=chat_limits())
    client.force_login(alice)
    page = client.get(f"/chat/{conversation.pk}/")
    assert b"Fine-tune on my corrections" in page.content and b'"feedback"' in page.content
    response = client.post("/chat/finetune-corrections/", {"checkpoint": checkpoint.pk})
    run = Run.objects.get(kind="sft")
    assert response.status_code == 302 and response["Location"] == f"/runs/{run.pk}/"
    dataset = ConversationDataset.objects.get(owner=alice)
    assert dataset.source_checkpoint == checkpoint and dataset.entries.count() == 1
    assert client.get(f"/chat/datasets/{dataset.pk}/").status_code == 200
    assert client.get("/chat/datasets/").status_code == 200


def test_no_one_sees_or_changes_another_users_feedback_or_datasets(client, alice, bob, checkpoint):
    conversation = chat_with(alice, checkpoint)
    reply = reply_of(conversation)
    corrections.give_feedback(alice, reply.pk, rating=1, lim=chat_limits())
    dataset = corrections.create_dataset(alice, "private")
    entry = corrections.add_conversation(alice, dataset.pk, conversation.pk)
    own = corrections.create_dataset(bob, "bob's")
    as_bob = api(bob)
    base = f"/api/chat/datasets/{dataset.pk}/"
    answers = [
        as_bob.post(f"/api/chat/messages/{reply.pk}/feedback/", {"rating": -1}, format="json"),
        as_bob.get(base),
        as_bob.patch(base, {"name": "mine"}, format="json"),
        as_bob.delete(base),
        as_bob.get(f"{base}export/"),
        as_bob.post(f"{base}collect/", {"checkpoint": checkpoint.pk}, format="json"),
        as_bob.post(f"{base}finetune/", {}, format="json"),
        as_bob.patch(f"{base}entries/{entry.pk}/", {"messages": []}, format="json"),
        as_bob.delete(f"{base}entries/{entry.pk}/"),
        as_bob.post(
            f"/api/chat/datasets/{own.pk}/entries/",
            {"conversation": conversation.pk},
            format="json",
        ),  # fmt: skip
    ]
    assert [a.status_code for a in answers] == [404] * len(answers)
    assert as_bob.get("/api/chat/datasets/").json() == [
        {**as_bob.get(f"/api/chat/datasets/{own.pk}/").json(), "entries": 0}
    ]
    client.force_login(bob)
    for url in (f"/chat/datasets/{dataset.pk}/", f"/chat/datasets/{dataset.pk}/export/",
                f"/chat/datasets/{dataset.pk}/entries/{entry.pk}/"):  # fmt: skip
        assert client.get(url).status_code == 404, url
    assert client.post(f"/chat/datasets/{dataset.pk}/delete/").status_code == 404
    assert b"private" not in client.get("/chat/datasets/").content
    reply.refresh_from_db()
    assert reply.feedback.rating == 1 and ConversationDataset.objects.filter(pk=dataset.pk)
    assert dataset.entries.count() == 1

    anonymous = APIClient()
    assert anonymous.get("/api/chat/datasets/").status_code in (401, 403)
    client.logout()
    assert client.get("/chat/datasets/").status_code == 302  # to the login page


def test_ids_past_int64_are_404_not_500(client, alice, checkpoint):
    """Schemathesis found DELETE .../datasets/<2**64>/entries/<id>/ answering 500 on SQLite."""
    conversation = chat_with(alice, checkpoint)
    corrections.give_feedback(alice, reply_of(conversation).pk, rating=1, lim=chat_limits())
    dataset = corrections.create_dataset(alice, "mine")
    entry = corrections.add_conversation(alice, dataset.pk, conversation.pk)
    huge = 2**64
    as_alice = api(alice)
    answers = [
        as_alice.get(f"/api/chat/datasets/{huge}/"),
        as_alice.delete(f"/api/chat/datasets/{huge}/entries/{entry.pk}/"),
        as_alice.patch(f"/api/chat/datasets/{huge}/entries/{huge}/", {"messages": []}, "json"),
        as_alice.delete(f"/api/chat/datasets/{dataset.pk}/entries/{huge}/"),
        as_alice.post(f"/api/chat/messages/{huge}/feedback/", {"rating": 1}, format="json"),
    ]
    assert [a.status_code for a in answers] == [404] * len(answers)
    client.force_login(alice)
    assert client.get(f"/chat/datasets/{huge}/entries/{entry.pk}/").status_code == 404
    assert dataset.entries.count() == 1
