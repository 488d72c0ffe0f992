"""Ranking keys (one registry) and the latent classes (alive, dead, ultra-dense).

Each key gives one score per latent, higher first. Dead latents (never active on the analyzed tokens) and
ultra-dense ones (active on more than `dense_threshold` of tokens; these are usually bias-like or
position-like directions, not features) are listed separately and left out of the ranking, as is a latent
whose score is undefined (NaN) under the chosen key.

`explanation` (the default) is how well the latent's explanation predicts it on held-out contexts
(detection, fuzzing and simulation; saepipe.analyze.explanations and saepipe.analyze.scoring): what a
researcher means by "this latent is readable". It is computed after the statistics pass and handed to
`scores`; every other key is a function of `LatentStats`.

`interpretability` is a token-concentration score for how easy a latent is to read off its top contexts:

    score = (filled / k) * exp(-H),   H = entropy of p(t) = sum of top activations peaking on token t / total

`exp(H)` is the effective number of distinct tokens the top-k activations peak on (weighted by activation),
so a latent whose top contexts all peak on one token scores 1 and one whose peaks spread over k different
tokens scores 1/k. The `filled / k` factor (top-k slots actually filled) keeps a latent seen active only
once or twice from scoring a trivial 1. It favours token-level, monosemantic-looking latents; that is the
point for triage, and `max_activation` or `frequency` give the other views.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from saepipe.analyze.contexts import WINDOW_BEFORE
from saepipe.analyze.stats import LatentStats


def peak_tokens(stats: LatentStats) -> np.ndarray:
    """[n_latents, k] token id at each top activation (-1 for empty slots)."""
    return stats.top.window_tokens[:, :, WINDOW_BEFORE]


def token_concentration(stats: LatentStats) -> np.ndarray:
    """The `interpretability` score above, [n_latents] in [0, 1]; 0 for dead latents."""
    values = np.nan_to_num(stats.top.values, nan=0.0).astype(np.float64)  # [L, k]
    tokens = peak_tokens(stats)
    k = values.shape[1]
    out = np.zeros(len(values))
    for i in np.flatnonzero(values[:, 0] > 0):
        filled = values[i] > 0
        _, inverse = np.unique(tokens[i, filled], return_inverse=True)
        mass = np.bincount(inverse, weights=values[i, filled])
        p = mass / mass.sum()
        entropy = float(-(p * np.log(p)).sum())
        out[i] = filled.sum() / k * np.exp(-entropy)
    return out


STAT_KEYS: dict[str, Callable[[LatentStats], np.ndarray]] = {
    "interpretability": token_concentration,
    "max_activation": lambda s: s.act_max.astype(np.float64),
    "frequency": lambda s: s.density,
    "mean_activation": lambda s: s.mean,
}
"""The keys computed from the statistics alone: name -> score per latent (higher ranks first)."""

RANKING_KEYS: dict[str, str] = {
    "explanation": "explanation score on held-out contexts (detection, fuzzing, simulation)",
    "interpretability": "token concentration of the top contexts",
    "max_activation": "largest activation",
    "frequency": "fraction of tokens where the latent is active",
    "mean_activation": "mean activation over all tokens",
}
"""Every ranking key with a one-line description."""


def scores(stats: LatentStats, explanation: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every key's score per latent (float64); `explanation` is the held-out explanation score or None
    (then that key is NaN everywhere: nothing is ranked by it)."""
    out = {"explanation": np.full(len(stats.n_active), np.nan) if explanation is None else explanation}
    out.update({k: fn(stats).astype(np.float64) for k, fn in STAT_KEYS.items()})
    return {k: out[k].astype(np.float64) for k in RANKING_KEYS}


def classify(stats: LatentStats, dense_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(dead, dense) boolean masks [n_latents]."""
    dead = stats.n_active == 0
    dense = stats.density > dense_threshold
    return dead, dense


def order(score: np.ndarray, dead: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Latent ids of the live, not ultra-dense latents with a defined score, best first (equal scores by
    id: see `tied`, which counts them)."""
    ids = np.flatnonzero(~dead & ~dense & np.isfinite(score))
    return ids[np.lexsort((ids, -score[ids]))]


def tied(score: np.ndarray, ids: np.ndarray) -> int:
    """How many of the ranked latents `ids` share their score with another ranked latent."""
    _, counts = np.unique(score[ids], return_counts=True)
    return int(counts[counts > 1].sum())


def rank(
    stats: LatentStats, key: str, dense_threshold: float, explanation: np.ndarray | None = None
) -> np.ndarray:
    """Latent ids ranked by `key` (see `order`)."""
    dead, dense = classify(stats, dense_threshold)
    return order(scores(stats, explanation)[key], dead, dense)
