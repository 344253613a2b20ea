"""The arena API and pages with Django's test client: blindness before the vote, one vote per
battle, another user's battles out of reach, bounded input. No engine worker: battles are made
ready in the database (the browser test streams real ones)."""

from __future__ import annotations

import pytest
from django.db import IntegrityError

from arena.models import Battle, Vote
from runs.models import Checkpoint

pytestmark = pytest.mark.django_db


@pytest.fixture
def pair():
    return [
        Checkpoint.objects.create(stage="sft", step=step, path="/nowhere/sft/d2")
        for step in (10, 20)
    ]


def ready_battle(owner, pair, status=Battle.Status.READY) -> Battle:
    return Battle.objects.create(
        owner=owner, status=status, prompt="Why is the sky blue?",
        sampling={"temperature": 0.8, "top_k": 50, "max_tokens": 16},
        checkpoint_a=pair[0], checkpoint_b=pair[1],
        label_a="SECRET-NAME-A", label_b="SECRET-NAME-B",
        reply_a="Rayleigh.", reply_b="Because.",
    )  # fmt: skip


def test_names_stay_hidden_until_the_vote_reveals_them(api, alice, pair):
    battle = ready_battle(alice, pair)
    client = api(alice)
    for url in ("/api/arena/battles/", f"/api/arena/battles/{battle.pk}/"):
        response = client.get(url)
        assert response.status_code == 200
        assert b"SECRET-NAME" not in response.content
    detail = client.get(f"/api/arena/battles/{battle.pk}/").json()
    assert detail["reveal"] is None and detail["reply_a"] == "Rayleigh."
    assert not {"checkpoint_a", "checkpoint_b", "label_a"} & set(detail)

    voted = client.post(f"/api/arena/battles/{battle.pk}/vote/", {"outcome": "a"}, format="json")
    assert voted.status_code == 200
    reveal = voted.json()["reveal"]
    assert reveal["outcome"] == "a"
    assert reveal["a"] == {"checkpoint": pair[0].pk, "label": "SECRET-NAME-A"}


def test_one_vote_per_battle_in_the_api_and_the_database(api, alice, pair):
    battle = ready_battle(alice, pair)
    url = f"/api/arena/battles/{battle.pk}/vote/"
    assert api(alice).post(url, {"outcome": "tie"}, format="json").status_code == 200
    again = api(alice).post(url, {"outcome": "b"}, format="json")
    assert again.status_code == 409
    assert Vote.objects.get(battle=battle).outcome == "tie"
    with pytest.raises(IntegrityError):
        Vote.objects.create(battle=battle, outcome="b")


def test_another_users_battle_cannot_be_read_or_voted(api, alice, bob, pair):
    battle = ready_battle(alice, pair)
    client = api(bob, token=True)
    assert client.get("/api/arena/battles/").json()["results"] == []
    assert client.get(f"/api/arena/battles/{battle.pk}/").status_code == 404
    vote = client.post(f"/api/arena/battles/{battle.pk}/vote/", {"outcome": "b"}, format="json")
    assert vote.status_code == 404
    assert not Vote.objects.exists()
    assert api().get("/api/arena/battles/").status_code == 403  # signed out


def test_votes_need_a_ready_battle_and_a_known_outcome(api, alice, pair):
    running = ready_battle(alice, pair, status=Battle.Status.RUNNING)
    url = f"/api/arena/battles/{running.pk}/vote/"
    assert api(alice).post(url, {"outcome": "a"}, format="json").status_code == 409
    ready = ready_battle(alice, pair)
    bad = api(alice).post(f"/api/arena/battles/{ready.pk}/vote/", {"outcome": "c"}, format="json")
    assert bad.status_code == 400 and "outcome" in bad.json()


def test_create_checks_input_like_the_chat(api, alice, pair, settings):
    client = api(alice)
    too_long = "x" * (settings.CHAT_LIMITS.get("max_message_chars", 8000) + 1)
    cases = [
        ({"content": too_long}, "content"),
        ({"content": "hi", "temperature": 9}, "temperature"),
        ({"content": "hi", "checkpoints": [pair[0].pk, pair[0].pk]}, "checkpoints"),
        ({"content": "hi", "checkpoints": [1, 2, 3]}, "checkpoints"),
    ]
    for body, field in cases:
        response = client.post("/api/arena/battles/", body, format="json")
        assert response.status_code == 400 and field in response.json(), body
    assert not Battle.objects.exists()


def test_create_without_an_engine_is_a_503_that_saves_nothing(
    api, alice, pair, settings, redis_url
):
    settings.CHAT_ENGINE_CHANNEL = "engine-arena-nobody"
    settings.CHAT_ENGINE_ACCEPT_TIMEOUT = 0.5
    body = {"content": "hi", "checkpoints": [pair[0].pk, pair[1].pk]}
    response = api(alice).post("/api/arena/battles/", body, format="json")
    assert response.status_code == 503, response.json()
    assert not Battle.objects.exists()


def test_ratings_reach_the_api_and_the_leaderboard(api, alice, client, pair):
    for outcome in ("a", "a", "tie", "both_bad"):
        Vote.objects.create(battle=ready_battle(alice, pair), outcome=outcome)
    rows = api(alice).get("/api/arena/ratings/").json()
    assert [r["checkpoint"] for r in rows] == [pair[0].pk, pair[1].pk]
    assert rows[0]["votes"] == 3  # both-bad is not counted
    assert rows[0]["low"] <= rows[0]["rating"] <= rows[0]["high"]

    client.force_login(alice)
    html = client.get("/leaderboard/?sort=Arena").content.decode()
    assert ">Arena</a>" in html
    assert f"{round(rows[0]['rating'])} <span" in html and "3 votes" in html
