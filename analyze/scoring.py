"""How well an explanation predicts its latent on held-out contexts (saepipe.analyze.heldout).

Three measures from the auto-interpretation literature, each on data the explanation was not built from:

- **detection** (context level; delphi's detection scorer): held-out windows where the latent is active
  (a uniform sample of its active positions, so every activation quantile in proportion) against
  held-out windows where it is inactive throughout. A window's prediction is the largest activation the
  explanation predicts on any of its scored slots. AUROC over the two sets, and precision, recall and
  balanced accuracy of "the explanation matches somewhere in the window".
- **fuzzing** (token level; delphi's fuzzing asks whether the highlighted tokens are the right ones):
  over the scored slots of the active held-out windows, does the explanation pick the tokens where the
  latent is active? AUROC of the predicted activation against "active", and precision, recall, balanced
  accuracy of "matches".
- **simulation** (Bills et al. 2023): the Pearson correlation between predicted and true activation
  over every scored slot of the active held-out windows and of all held-out pool windows. Unlike the
  other two it sees magnitudes, so explanations that are perfect detectors still differ in how well
  they predict how strongly the latent fires (0 when the explanation predicts one constant).

The ranking score is the mean of the three, each mapped so that chance is 0 and perfect is 1:

    score = ((2 AUROC_detection - 1) + (2 AUROC_fuzzing - 1) + r_simulation) / 3

(a measure that is undefined, e.g. detection without inactive windows, is left out of the mean). A latent
with fewer than `--score-min-active` held-out active windows has no score (NaN) and is not ranked by it:
with one or two positives, the measures take a handful of values and cannot tell explanations apart.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from saepipe.analyze.explain import Explanation, window_keys
from saepipe.analyze.heldout import Material, Split


@dataclass
class Scores:
    """One latent's scores; NaN where undefined."""

    score: float = np.nan
    detection_auroc: float = np.nan
    detection_precision: float = np.nan
    detection_recall: float = np.nan
    detection_balanced_accuracy: float = np.nan
    fuzzing_auroc: float = np.nan
    fuzzing_precision: float = np.nan
    fuzzing_recall: float = np.nan
    fuzzing_balanced_accuracy: float = np.nan
    simulation: float = np.nan
    heldout_active: int = 0
    """Held-out windows where the latent is active (detection positives)."""
    heldout_inactive: int = 0
    """Held-out windows where it is inactive throughout (detection negatives)."""

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(Scores)]


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting one half (Mann-Whitney U)."""
    if len(pos) == 0 or len(neg) == 0:
        return np.nan
    values = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    midrank = np.cumsum(counts) - (counts - 1) / 2  # 1-based average rank of each distinct value
    u = midrank[inverse[: len(pos)]].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def binary(pred_pos: np.ndarray, pred_neg: np.ndarray) -> tuple[float, float, float]:
    """(precision, recall, balanced accuracy) of boolean predictions on positives and negatives."""
    tp, fp = float(pred_pos.sum()), float(pred_neg.sum())
    precision = tp / (tp + fp) if tp + fp else np.nan
    recall = tp / len(pred_pos) if len(pred_pos) else np.nan
    specificity = 1 - fp / len(pred_neg) if len(pred_neg) else np.nan
    return precision, recall, (recall + specificity) / 2


def pearson(p: np.ndarray, a: np.ndarray) -> float:
    """Correlation; 0 when either side is constant (a constant prediction carries no information)."""
    if len(p) < 2:
        return np.nan
    p, a = p - p.mean(), a - a.mean()
    den = np.sqrt((p * p).sum() * (a * a).sum())
    return float((p * a).sum() / den) if den > 0 else 0.0


def combine(detection_auroc: float, fuzzing_auroc: float, simulation: float) -> float:
    parts = [2 * detection_auroc - 1, 2 * fuzzing_auroc - 1, simulation]
    parts = [x for x in parts if np.isfinite(x)]
    return float(np.mean(parts)) if parts else np.nan


def score_predictions(
    pos_pred: np.ndarray,
    pos_acts: np.ndarray,
    pos_ok: np.ndarray,
    pool_pred: np.ndarray,
    pool_acts: np.ndarray,
    pool_ok: np.ndarray,
) -> Scores:
    """Scores from predictions on held-out windows: positives [n, W] (active at their centre) and pool
    windows [m, W]; `*_ok` mark the scored slots. The simple reference every scorer ends in."""
    if len(pos_pred) == 0:
        return Scores()
    neg = ~(pool_acts > 0).any(1)
    win_pos = np.where(pos_ok, pos_pred, 0).max(1)
    win_neg = np.where(pool_ok, pool_pred, 0).max(1)[neg]
    det_auc = auroc(win_pos, win_neg)
    det = binary(win_pos > 0, win_neg > 0)
    labels = pos_acts[pos_ok] > 0
    tok = pos_pred[pos_ok]
    fuzz_auc = auroc(tok[labels], tok[~labels])
    fuzz = binary(tok[labels] > 0, tok[~labels] > 0)
    sim = pearson(
        np.concatenate([tok, pool_pred[pool_ok]]), np.concatenate([pos_acts[pos_ok], pool_acts[pool_ok]])
    )
    return Scores(
        combine(det_auc, fuzz_auc, sim), det_auc, *det, fuzz_auc, *fuzz, sim, len(win_pos), int(neg.sum())
    )


def score_explanation(expl: Explanation, mat: Material, split: Split) -> Scores:
    """Score a deterministic explanation on one latent's held-out material."""
    pos = mat.positives
    return score_predictions(
        expl.predict(window_keys(pos.tokens)),
        pos.acts,
        pos.scored,
        expl.predict(split.pool_window_keys),
        mat.pool_acts,
        split.pool_windows.scored,
    )
