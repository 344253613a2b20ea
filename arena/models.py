"""Arena battles: one prompt answered by two checkpoints shown blind as A and B, and the vote.

A battle keeps everything the vote was cast on -- the prompt, the sampling settings (seeds
included), both replies with their generation stats -- so a rating can be audited or refitted
later, and so the reveal still names the models after a checkpoint row is deleted (the label
is copied when the battle starts; the foreign key then goes null and the battle leaves the
ratings).

The vote is a row of its own, one per battle at most (a one-to-one key: the database refuses
a second vote whatever the code above it does), and is never edited: nothing updates it.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import F, Q


class Battle(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running"  # both replies are being generated
        READY = "ready"  # both replies saved: waiting for the vote (or voted)

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="battles"
    )
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.RUNNING)
    prompt = models.TextField()
    # temperature, top_k, max_tokens (as asked) and each side's seed and capped max_tokens.
    sampling = models.JSONField(default=dict)
    checkpoint_a = models.ForeignKey(
        "runs.Checkpoint", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    checkpoint_b = models.ForeignKey(
        "runs.Checkpoint", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    label_a = models.CharField(max_length=300)
    label_b = models.CharField(max_length=300)
    reply_a = models.TextField(blank=True)
    reply_b = models.TextField(blank=True)
    # What the engine reported for each reply: finish_reason, token counts, timings.
    stats_a = models.JSONField(default=dict, blank=True)
    stats_b = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(checkpoint_a__isnull=True)
                | Q(checkpoint_b__isnull=True)
                | ~Q(checkpoint_a=F("checkpoint_b")),
                name="arena_battle_two_checkpoints",
            )
        ]

    def __str__(self) -> str:
        return f"battle {self.pk} of {self.owner_id}"


class Vote(models.Model):
    class Outcome(models.TextChoices):
        A = "a", "A is better"
        B = "b", "B is better"
        TIE = "tie", "Tie"
        BOTH_BAD = "both_bad", "Both are bad"

    battle = models.OneToOneField(Battle, on_delete=models.CASCADE, related_name="vote")
    outcome = models.CharField(max_length=8, choices=Outcome.choices)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.outcome} on battle {self.battle_id}"
