"""Explain every latent and score the explanations on held-out contexts: the `explanation` ranking key.

    table = explain_and_score(stats, first)       # after the statistics pass; no model, no re-encoding
    table.scores["score"]                          # [n_latents], NaN where a latent cannot be scored

The deterministic explainer (saepipe.analyze.explain) builds each explanation from the latent's build
material and the scorers (saepipe.analyze.scoring) judge it on the held-out material
(saepipe.analyze.heldout). A language-model explainer (saepipe.analyze.lm_explainer) uses the same
material through the same `Scores`.

`explain_and_score` is the simple per-latent loop; `SAEPIPE_SIMPLE_STATS=0` (the default) runs the
batched path of saepipe.analyze.explain_fast, tested equal to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from saepipe.analyze.contexts import WINDOW, ContextSet
from saepipe.analyze.explain import MAX_PATTERNS, Explanation, explain
from saepipe.analyze.heldout import Split, is_build
from saepipe.analyze.scoring import Scores, score_explanation
from saepipe.analyze.stats import LatentStats


@dataclass
class ExplanationTable:
    """Per latent: its explanation and its held-out scores (one array per `Scores` field)."""

    explanations: list[Explanation]
    scores: dict[str, np.ndarray]

    def texts(self, vocab: Callable[[int], str]) -> list[str]:
        return [e.text(vocab) for e in self.explanations]

    def pattern_arrays(self) -> dict[str, np.ndarray]:
        """The explanations as fixed-width arrays [L, MAX_PATTERNS] (key 0: no pattern) for the report."""
        L = len(self.explanations)
        keys = np.zeros((L, MAX_PATTERNS), dtype=np.int64)
        out = {name: np.full((L, MAX_PATTERNS), np.nan) for name in ("predicted", "share", "precision")}
        for i, e in enumerate(self.explanations):
            n = len(e.keys)
            keys[i, :n] = e.keys
            for name in out:
                out[name][i, :n] = getattr(e, name)
        return {"explanation_keys": keys, **{f"explanation_{k}": v for k, v in out.items()}}


def _require(scores: dict[str, np.ndarray], min_active: int) -> dict[str, np.ndarray]:
    """No overall score for latents with fewer than `min_active` held-out active windows."""
    scores["score"] = np.where(scores["heldout_active"] >= min_active, scores["score"], np.nan)
    return scores


def explain_and_score(
    stats: LatentStats, first: int, min_active: int = 1, progress: bool = False
) -> ExplanationTable:
    """Explain and score every latent with activations (the simple reference: one latent at a time);
    latents with fewer than `min_active` held-out active windows get no overall score."""
    split = Split(stats, first)
    L = len(stats.n_active)
    explanations = [Explanation.empty()] * L
    rows: list[Scores] = [Scores()] * L
    for i in tqdm(np.flatnonzero(stats.n_active > 0), desc="explain", disable=not progress):
        mat = split.material(int(i))
        explanations[i] = explain(
            mat.active_keys, mat.active_acts, lambda k, mat=mat: split.match_count(mat, k)
        )
        rows[i] = score_explanation(explanations[i], mat, split)
    scores = {name: np.array([getattr(r, name) for r in rows], dtype=np.float64) for name in Scores.names()}
    return ExplanationTable(explanations, _require(scores, min_active))


def explain_and_score_fast(stats: LatentStats, first: int, min_active: int = 1) -> ExplanationTable:
    """The same as `explain_and_score`, batched over latents (saepipe.analyze.explain_fast)."""
    from saepipe.analyze.explain_fast import build_candidates, choose_all, score_all

    split = Split(stats, first)
    explanations = choose_all(build_candidates(split), len(stats.n_active))
    return ExplanationTable(explanations, _require(score_all(split, explanations), min_active))


def heldout_examples(stats: LatentStats, n: int) -> ContextSet:
    """[L, n]: the first `n` held-out active windows of each latent (reservoir entries in held-out
    contexts, in the reservoir's random order); empty slots as in ContextSet."""
    L = len(stats.n_active)
    out = ContextSet(
        np.full((L, n), np.nan, dtype=np.float32),
        np.full((L, n), -1, dtype=np.int64),
        np.full((L, n), -1, dtype=np.int64),
        np.full((L, n, WINDOW), -1, dtype=np.int32),
        np.full((L, n, WINDOW), np.nan, dtype=np.float32),
    )
    res = stats.reservoir
    if res is None:
        return out
    sel = (res.contexts >= 0) & ~is_build(res.contexts)
    slot = np.cumsum(sel, 1) - 1
    lat, j = np.nonzero(sel & (slot < n))
    for name in ("values", "contexts", "positions", "window_tokens", "window_acts"):
        getattr(out, name)[lat, slot[lat, j]] = getattr(res, name)[lat, j]
    return out
