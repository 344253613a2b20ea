"""The arena page: pick (or draw) two checkpoints, ask once, read both replies blind, vote.

The page itself carries no battle: replies stream over /ws/arena/ and the vote goes to the
REST API (POST /api/arena/battles/<id>/vote/), whose answer is the first thing that names the
checkpoints. The picker lists checkpoints by name on purpose -- choosing a pair is allowed --
but the sides are shuffled by the server, so a pick does not say which side is which.
"""

from __future__ import annotations

from dataclasses import asdict

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET

from arena import services
from chat.services import chat_limits, checkpoints_for_picker
from runs import pages as runs_pages

PICKER_SIZE = 200


@login_required
@require_GET
def arena_page(request):
    options = [
        {"id": c.pk, "label": services.label(c)} for c in checkpoints_for_picker()[:PICKER_SIZE]
    ]
    limits = chat_limits()
    state = {
        "limits": asdict(limits),
        "urls": {"socket": "/ws/arena/", "battles": reverse("arena-api:battle-list")},
    }
    context = {"checkpoints": options, "limits": limits, "state": state,
               "ratings": services.rating_rows()[:10]}  # fmt: skip
    return render(request, "arena/arena.html", context)


@login_required
@require_GET
def leaderboard(request):
    """The eval leaderboard with the Arena column: runs/pages.py draws it; the ratings are
    this app's, and runs sits below arena, so the page is served from here."""
    return runs_pages.leaderboard(request, ratings=services.ratings_by_checkpoint())
