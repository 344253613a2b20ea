"""arena/ratings.py on synthetic battles: no database, milliseconds."""

import numpy as np

from arena.ratings import LOSS, TIE, WIN, Battle, fit

STRENGTHS = {"weak": 0.0, "fair": 0.7, "good": 1.4, "best": 2.1}  # natural-log odds


def battles(count: int, seed: int = 0) -> list[Battle]:
    """`count` battles between random pairs, won by the Bradley–Terry odds of STRENGTHS; about
    one in ten is a tie."""
    rng = np.random.default_rng(seed)
    names = list(STRENGTHS)
    out = []
    for _ in range(count):
        i, j = rng.choice(len(names), 2, replace=False)
        a, b = names[i], names[j]
        p = 1 / (1 + np.exp(STRENGTHS[b] - STRENGTHS[a]))
        score = TIE if rng.random() < 0.1 else (WIN if rng.random() < p else LOSS)
        out.append(Battle(a, b, score))
    return out


def test_known_strengths_are_recovered_in_order():
    ratings = fit(battles(600))
    ranked = sorted(ratings, key=lambda name: ratings[name].rating)
    assert ranked == ["weak", "fair", "good", "best"]
    assert sum(r.votes for r in ratings.values()) == 2 * 600
    for r in ratings.values():
        assert r.low <= r.rating <= r.high
    # 400 points per factor of 10 in odds: best vs weak is e^2.1 : 1, about 365 points.
    assert 250 < ratings["best"].rating - ratings["weak"].rating < 480


def test_intervals_shrink_with_more_votes():
    few, many = fit(battles(60)), fit(battles(1200))
    for name in STRENGTHS:
        assert many[name].margin < few[name].margin / 2, name


def test_the_fit_is_reproducible_and_a_sweep_stays_finite():
    data = battles(100)
    assert fit(data) == fit(data)  # a fixed seed: the same interval on every page load
    sweep = fit([Battle("x", "y", WIN)] * 5)  # x never lost: still a finite rating
    assert np.isfinite(sweep["x"].rating) and sweep["x"].rating > sweep["y"].rating
    assert fit([]) == {}
