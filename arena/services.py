"""Arena business logic: start a battle, generate its two replies, record the vote, rate.

The websocket (arena/consumers.py), the REST API (arena/api.py), the page and the admin all
go through these functions, so "who may see a battle's names" or "what counts as a vote" is
decided once.

A battle is made in three steps, like a chat reply (chat/services.py): `begin_battle` checks
the input, picks the two checkpoints, hides them behind sides A and B in a random order and
saves the battle as running; `generate` drives both replies at once on the engine workers
(two `Reply`s of chat/protocol.py, the machinery of the chat page) and hands each chunk to a
callback; `finish_battle` saves both replies, or `abandon_battle` deletes the battle when
either reply failed -- a battle with one reply cannot be voted on.

Blindness: nothing a client can read names a side's checkpoint before the vote
(`reveal(battle)` is the only way to the names, and it answers None until then), and the sides
are shuffled even when the user chose both checkpoints, so the order of a pick tells nothing.
Another user's battle is reported exactly like a missing one.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import QuerySet

from arena import ratings
from arena.models import Battle, Vote
from chat import checkpoints as chat_checkpoints
from chat.context import chat_prompt, fit_chat
from chat.limits import FieldError, Sampling
from chat.protocol import Chunk, Final, GenerationRequest, Reply
from runs import selectors
from runs.models import Checkpoint

SIDES = ("a", "b")
# Checkpoints a battle is drawn from when the user does not choose: the newest of each
# checkpoint directory, chat-tuned first (the chat page's shortlist), at most this many.
DRAW_POOL = 20
# Votes that move a rating and what they count as (see arena/ratings.py for why "both bad" is
# left out).
SCORES = {Vote.Outcome.A: ratings.WIN, Vote.Outcome.B: ratings.LOSS, Vote.Outcome.TIE: ratings.TIE}


class NotFound(Exception):
    """No such battle for this user (another user's battle looks the same)."""


class Conflict(Exception):
    """The battle is not in a state that allows this (still generating, already voted)."""


@dataclass(frozen=True)
class PendingBattle:
    battle_id: int
    requests: dict[str, GenerationRequest]  # by side

    @property
    def max_tokens(self) -> dict[str, int]:
        return {side: request.max_tokens for side, request in self.requests.items()}


def label(checkpoint: Checkpoint) -> str:
    """What the reveal shows: the chat picker's label, with the row id (two steps or copies of
    one model can look alike)."""
    return f"{chat_checkpoints.label(checkpoint, chat_checkpoints.model_config(checkpoint))} · #{checkpoint.pk}"


def eligible_checkpoints() -> list[Checkpoint]:
    """The checkpoints a battle may be drawn from."""
    return selectors.chat_checkpoints(limit=DRAW_POOL)


def pick_checkpoints(chosen: Sequence[int | None]) -> list[Checkpoint]:
    """Two different checkpoints: the ones chosen (up to two ids; None for "draw one") and the
    rest drawn at random from the eligible ones."""
    chosen = [c for c in chosen if c is not None]
    if len(chosen) > 2:
        raise FieldError("checkpoints", "a battle has two checkpoints")
    if len(set(chosen)) < len(chosen):
        raise FieldError("checkpoints", "choose two different checkpoints")
    found = {c.pk: c for c in Checkpoint.objects.filter(pk__in=chosen)}
    if len(found) < len(chosen):
        raise FieldError("checkpoints", "no such checkpoint")
    picked = [found[c] for c in chosen]
    pool = [c for c in eligible_checkpoints() if c.pk not in found]
    while len(picked) < 2:
        if not pool:
            raise FieldError("checkpoints", "the arena needs two checkpoints to chat with")
        picked.append(pool.pop(secrets.randbelow(len(pool))))
    return picked


def begin_battle(
    user, content: str, chosen: Sequence[int | None], sampling: Sampling
) -> PendingBattle:
    """Save a running battle of `content` between two checkpoints in a random order.

    `content` and `sampling` come validated by chat/limits.py (the chat's own bounds)."""
    picked = pick_checkpoints(chosen)
    if secrets.randbelow(2):
        picked.reverse()
    requests = {
        side: _request(ckpt, content, sampling) for side, ckpt in zip(SIDES, picked, strict=True)
    }
    used = {
        **sampling.as_dict(),
        **{f"seed_{side}": r.seed for side, r in requests.items()},
        **{f"max_tokens_{side}": r.max_tokens for side, r in requests.items()},
    }
    battle = Battle.objects.create(
        owner=user, prompt=content, sampling=used,
        checkpoint_a=picked[0], checkpoint_b=picked[1],
        label_a=label(picked[0]), label_b=label(picked[1]),
    )  # fmt: skip
    return PendingBattle(battle.pk, requests)


def _request(checkpoint: Checkpoint, content: str, sampling: Sampling) -> GenerationRequest:
    """The engine request for a one-message chat with `checkpoint`, its max_tokens capped by
    what the model's context leaves (chat/context.py, as the chat does). A checkpoint whose
    files cannot be read here goes unfitted; the engine then judges the prompt."""
    messages = [{"role": "user", "content": content}]
    max_tokens = sampling.max_tokens
    config = chat_checkpoints.model_config(checkpoint)
    context = chat_checkpoints.context_length(config)
    tokenizer = chat_checkpoints.tokenizer_for(checkpoint) if context else None
    if tokenizer is not None:
        max_tokens = fit_chat(tokenizer, messages, "", context, max_tokens).max_tokens
    return GenerationRequest(
        checkpoint_path=checkpoint.path,
        step=checkpoint.step,
        messages=chat_prompt(messages, ""),
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        max_tokens=max_tokens,
        seed=secrets.randbelow(2**31),
    )


OnChunk = Callable[[str, Chunk], Awaitable[None]]


async def generate(
    pending: PendingBattle, on_chunk: OnChunk | None = None, layer=None
) -> dict[str, Final]:
    """Both replies, generated at the same time; `on_chunk(side, chunk)` sees each piece as it
    comes. When either fails (EngineError) the other is stopped and the error raised; when
    the caller is cancelled (a closed socket) both are stopped."""

    async def one(side: str) -> Final:
        final = None
        async with Reply(pending.requests[side], layer=layer) as reply:
            async for event in reply:
                if isinstance(event, Chunk):
                    if on_chunk is not None:
                        await on_chunk(side, event)
                else:
                    final = event
        return final

    tasks = {side: asyncio.ensure_future(one(side)) for side in SIDES}
    try:
        await asyncio.gather(*tasks.values())
    finally:  # a failure or a cancellation: stop the other reply too (leaving its Reply stops it)
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return {side: task.result() for side, task in tasks.items()}


def finish_battle(pending: PendingBattle, finals: dict[str, Final]) -> Battle:
    """Save both replies: the battle is ready for its vote."""
    battle = Battle.objects.get(pk=pending.battle_id)
    for side in SIDES:
        setattr(battle, f"reply_{side}", finals[side].content)
        setattr(battle, f"stats_{side}", finals[side].stats())
    battle.status = Battle.Status.READY
    battle.save()
    return battle


def abandon_battle(pending: PendingBattle) -> None:
    """Delete a battle whose replies could not both be generated."""
    Battle.objects.filter(pk=pending.battle_id, status=Battle.Status.RUNNING).delete()


def battles_of(user) -> QuerySet[Battle]:
    return Battle.objects.filter(owner=user).select_related("vote")


def get_battle(user, battle_id: int) -> Battle:
    try:
        return battles_of(user).get(pk=battle_id)
    except Battle.DoesNotExist:
        raise NotFound("no such battle") from None


def vote(user, battle_id: int, outcome: str) -> Battle:
    """Record the owner's one vote on a ready battle. Conflict when it is still generating or
    already has its vote (the one-to-one key settles a race between two requests)."""
    if outcome not in Vote.Outcome.values:
        raise FieldError("outcome", f"outcome must be one of {', '.join(Vote.Outcome.values)}")
    battle = get_battle(user, battle_id)
    if battle.status != Battle.Status.READY:
        raise Conflict("the replies are still being generated")
    if hasattr(battle, "vote"):
        raise Conflict("this battle already has its vote")
    try:
        with transaction.atomic():
            battle.vote = Vote.objects.create(battle=battle, outcome=outcome)
    except IntegrityError:
        raise Conflict("this battle already has its vote") from None
    return battle


def reveal(battle: Battle) -> dict[str, Any] | None:
    """The names behind A and B once the battle has its vote, else None."""
    if not hasattr(battle, "vote"):
        return None
    return {
        "outcome": battle.vote.outcome,
        "a": {"checkpoint": battle.checkpoint_a_id, "label": battle.label_a},
        "b": {"checkpoint": battle.checkpoint_b_id, "label": battle.label_b},
    }


# ---- ratings -------------------------------------------------------------------------------


def rated_battles() -> QuerySet[Vote]:
    """Votes that count: A, B or tie, on battles whose checkpoints both still exist."""
    return Vote.objects.filter(
        outcome__in=list(SCORES),
        battle__checkpoint_a__isnull=False,
        battle__checkpoint_b__isnull=False,
    )


def ratings_by_checkpoint() -> dict[int, ratings.Rating]:
    """{checkpoint id: Rating} fitted on every counted vote.

    The fit is cached under a digest of the counted votes themselves (one cheap query): a new
    vote or a deleted checkpoint changes it, anything else reuses the fit -- the bootstrap is
    the costly part, and the leaderboard asks on every load."""
    rows = list(
        rated_battles()
        .order_by("id")
        .values_list("battle__checkpoint_a_id", "battle__checkpoint_b_id", "outcome")
    )
    key = "arena-ratings:" + hashlib.sha256(repr(rows).encode()).hexdigest()
    found = cache.get(key)
    if found is None:
        found = ratings.fit(ratings.Battle(a, b, SCORES[o]) for a, b, o in rows)
        cache.set(key, found, 3600)
    return found


def rating_rows() -> list[dict[str, Any]]:
    """The rated checkpoints, best first: {checkpoint, label, rating, low, high, votes}."""
    found = ratings_by_checkpoint()
    checkpoints = Checkpoint.objects.in_bulk(list(found))
    rows = [
        {"checkpoint": pk, "label": label(checkpoints[pk]), **vars(rating)}
        for pk, rating in found.items()
        if pk in checkpoints
    ]
    return sorted(rows, key=lambda row: -row["rating"])
