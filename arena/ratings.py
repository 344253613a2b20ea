"""Arena ratings: a Bradley–Terry model fitted on every vote, on an Elo-like scale.

Why Bradley–Terry on the whole history rather than online Elo: Elo depends on the order the
votes came in (the same votes replayed in another order give other ratings) and on a K factor
nobody can justify; the Bradley–Terry maximum-likelihood fit depends only on *which* battles
happened, so a rating never drifts just because of when someone voted.

The model: checkpoint i has strength θ_i and beats j with probability σ(θ_i − θ_j). A battle
scores 1 for a win, 0 for a loss and ½ for a tie (a tie is half a win for each side). A
"both bad" vote is left out by the caller (arena/services.py): it says the prompt defeated both
models, not that they are equally good, and counting it as a tie would pull a strong model
towards a weak one on hard prompts. A small L2 penalty on θ (a weak prior that every model is
average) keeps the fit finite for a checkpoint that has only won or only lost, and leaves one
that has no battles at the middle of the scale.

The scale is Elo-like: rating = 1000 + 400·log10(e^θ), so 400 points apart means 10:1 odds.

The uncertainty is a bootstrap: the battles are resampled with replacement (a fixed seed, so
the page shows the same interval on every load, and a bounded number of rounds, so it costs a
bounded time) and refitted; the interval is the 2.5th–97.5th percentiles of each checkpoint's
rating over the rounds. It narrows as votes accumulate.

Pure Python + numpy, no Django: the fit is tested on synthetic battles without a database.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

BASE = 1000.0
SCALE = 400.0 / math.log(10)  # natural-log strength -> rating points
PRIOR = 0.01  # L2 penalty on θ: finite ratings for undefeated or winless checkpoints
BOOTSTRAP_ROUNDS = 200
MAX_BOOTSTRAP_ROUNDS = 1000
SEED = 17
NEWTON_STEPS = 50
TOLERANCE = 1e-9
# A battle's score for its side A.
WIN, TIE, LOSS = 1.0, 0.5, 0.0


@dataclass(frozen=True)
class Battle:
    a: Hashable
    b: Hashable
    score: float  # for a: WIN, TIE or LOSS


@dataclass(frozen=True)
class Rating:
    rating: float
    low: float  # the bootstrap interval's ends
    high: float
    votes: int  # battles the checkpoint took part in

    @property
    def margin(self) -> float:
        """Half the interval's width: what '± n' shows."""
        return (self.high - self.low) / 2


def fit(
    battles: Iterable[Battle], rounds: int = BOOTSTRAP_ROUNDS, seed: int = SEED
) -> dict[Hashable, Rating]:
    """The rating of every player that took part in a battle, with its bootstrap interval."""
    battles = [b for b in battles if b.a != b.b]
    if not battles:
        return {}
    players = sorted({p for b in battles for p in (b.a, b.b)}, key=repr)
    index = {p: i for i, p in enumerate(players)}
    a = np.array([index[b.a] for b in battles])
    b = np.array([index[b.b] for b in battles])
    score = np.array([b.score for b in battles], dtype=float)
    votes = np.bincount(a, minlength=len(players)) + np.bincount(b, minlength=len(players))
    # Identical battles (same sides, same result) are one group with a count, so a fit costs
    # the same for ten thousand votes as for a hundred; resampling battles with replacement
    # is then drawing the groups' counts from a multinomial.
    groups, counts = np.unique(np.stack([a, b, score]), axis=1, return_counts=True)
    a, b, score = groups[0].astype(int), groups[1].astype(int), groups[2]
    theta = _strengths(len(players), a, b, score, counts.astype(float))
    rounds = max(1, min(int(rounds), MAX_BOOTSTRAP_ROUNDS))
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(players)))
    for r in range(rounds):
        resampled = rng.multinomial(len(battles), counts / len(battles)).astype(float)
        samples[r] = _strengths(len(players), a, b, score, resampled, start=theta)
    low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    return {
        p: Rating(_points(theta[i]), _points(low[i]), _points(high[i]), int(votes[i]))
        for i, p in enumerate(players)
    }


def _points(theta: float) -> float:
    return BASE + SCALE * float(theta)


def _strengths(
    n: int,
    a: np.ndarray,
    b: np.ndarray,
    score: np.ndarray,
    weights: np.ndarray,
    start: Sequence[float] | None = None,
) -> np.ndarray:
    """θ maximising the penalised Bradley–Terry log-likelihood of the weighted battles, by
    Newton's method (the objective is strictly concave, so it converges in a few steps)."""
    theta = np.zeros(n) if start is None else np.array(start, dtype=float)
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(theta[b] - theta[a]))  # P(a beats b)
        residual = weights * (score - p)
        grad = np.bincount(a, residual, n) - np.bincount(b, residual, n) - PRIOR * theta
        curvature = weights * p * (1.0 - p)
        hessian = np.zeros((n, n))
        np.add.at(hessian, (a, b), curvature)
        np.add.at(hessian, (b, a), curvature)
        hessian -= np.diag(hessian.sum(axis=1) + PRIOR)
        step = np.linalg.solve(hessian, grad)
        theta -= step
        if np.max(np.abs(step)) < TOLERANCE:
            break
    return theta
