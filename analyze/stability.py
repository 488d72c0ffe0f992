"""Seed stability: how many latents of one SAE a second SAE finds again (issue 19).

Why: split trees compare latents across widths, and that only means something if a second run of the
same width finds the same latents. The measure, for dictionaries A [m_a, d] and B [m_b, d] (decoder rows):

    best_a[i]  = max_j |cos(A_i, B_j)|     (a latent and its negation count as one direction)
    agreement  = fraction of A's latents with best_a > threshold (default 0.7), averaged with B -> A
    weighted   = the same fractions weighted by each latent's firing frequency (a latent that fires on
                 half the tokens counts more than one that fires once)
    baseline   = the agreement of each dictionary with as many random unit directions (Gaussian, seeded)
                 as the other has: what chance alone gives at this d and width

`stability(A, B, fires_a, fires_b)` returns all of them with the median best cosines. Two identical
dictionaries, up to a permutation and signs of their rows, agree on 100%; two random ones agree at the
baseline (tests/test_stability.py). The splitting report computes it for a same-width pair of seeds and
shows every cross-width split-tree count against the counts the same linking finds between the two seeds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

THRESHOLD = 0.7
"""Decoder cosine above which two latents count as the same (Paulo & Belrose 2025 use 0.7 as well)."""


def _unit(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def best_abs_cos(a: np.ndarray, b: np.ndarray, block: int = 4096) -> np.ndarray:
    """[m_a] max over B's rows of |cos| for each row of A [m_a, d] (B [m_b, d]); blocked to bound memory."""
    ua, ub = _unit(a), _unit(b)
    out = np.empty(len(ua))
    for s in range(0, len(ua), block):
        out[s : s + block] = np.abs(ua[s : s + block] @ ub.T).max(axis=1)
    return out


def random_directions(n: int, d: int, seed: int) -> np.ndarray:
    """n unit vectors uniform on the sphere in d dimensions (seeded)."""
    return _unit(np.random.default_rng([19, seed]).standard_normal((n, d)))


def agreement(best: np.ndarray, threshold: float, weights: np.ndarray | None = None) -> float:
    """Fraction (weighted when `weights` is given and not all zero) of latents with best cosine > threshold."""
    hit = best > threshold
    if weights is None or float(np.sum(weights)) == 0:
        return float(hit.mean()) if len(hit) else float("nan")
    w = np.asarray(weights, dtype=np.float64)
    return float((w * hit).sum() / w.sum())


@dataclass(frozen=True)
class Stability:
    """Agreement between two dictionaries (see the module doc); fractions in [0, 1]."""

    threshold: float
    agreement: float
    """Mean of the two directions' unweighted fractions."""
    weighted: float | None
    """Mean of the two directions' firing-weighted fractions (None without firing counts)."""
    baseline: float
    """The same measure between each dictionary and random directions."""
    a_to_b: float
    b_to_a: float
    median_best_cos: float
    """Median over both dictionaries' latents of the best |cos| in the other."""
    baseline_median_best_cos: float

    def to_dict(self) -> dict:
        return asdict(self)


def stability(
    dec_a: np.ndarray,
    dec_b: np.ndarray,
    fires_a: np.ndarray | None = None,
    fires_b: np.ndarray | None = None,
    threshold: float = THRESHOLD,
    seed: int = 0,
) -> Stability:
    """How much dictionaries A [m_a, d] and B [m_b, d] agree, with firing counts for the weighted measure."""
    best_a, best_b = best_abs_cos(dec_a, dec_b), best_abs_cos(dec_b, dec_a)
    d = dec_a.shape[1]
    rand_a = best_abs_cos(dec_a, random_directions(len(dec_b), d, seed))
    rand_b = best_abs_cos(dec_b, random_directions(len(dec_a), d, seed + 1))
    a_to_b, b_to_a = agreement(best_a, threshold), agreement(best_b, threshold)
    weighted = None
    if fires_a is not None and fires_b is not None:
        weighted = (agreement(best_a, threshold, fires_a) + agreement(best_b, threshold, fires_b)) / 2
    return Stability(
        threshold=threshold,
        agreement=(a_to_b + b_to_a) / 2,
        weighted=weighted,
        baseline=(agreement(rand_a, threshold) + agreement(rand_b, threshold)) / 2,
        a_to_b=a_to_b,
        b_to_a=b_to_a,
        median_best_cos=float(np.median(np.concatenate([best_a, best_b]))),
        baseline_median_best_cos=float(np.median(np.concatenate([rand_a, rand_b]))),
    )


def one_way(dec_a: np.ndarray, dec_b: np.ndarray, fires_a: np.ndarray | None, threshold: float) -> dict:
    """A's latents found again in B (e.g. a narrow SAE's latents in the next wider one): unweighted and
    firing-weighted fractions above `threshold`, and the median best |cos|."""
    best = best_abs_cos(dec_a, dec_b)
    return {
        "agreement": agreement(best, threshold),
        "weighted": agreement(best, threshold, fires_a) if fires_a is not None else None,
        "median_best_cos": float(np.median(best)),
    }


def identity(sae: Any) -> dict:
    """What two replicates share: saepipe's architecture, width, k and training budget (a loaded SAE)."""
    from saepipe.train.sae_dir import SAERecord

    training = SAERecord.of(sae).training
    return {
        "architecture": sae.architecture,
        "d_sae": int(sae.d_sae),
        "k": sae.k,
        "tokens": training.get("tokens"),
    }


def seed_groups(cfgs: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """Split SAEs (their `identity`, sorted by width) into the ladder and same-width seed pairs.

    SAEs with the same architecture, width, k and training budget are replicates (`saepipe train --seed
    0 1`; two budgets of one width are not): the first of each such group stays in the ladder, and it is
    paired with the second. Returns (indices of the ladder, [(ladder index, replicate index)])."""
    first: dict[tuple, int] = {}
    ladder, pairs = [], []
    for i, c in enumerate(cfgs):
        key = (c.get("architecture"), int(c["d_sae"]), c.get("k"), str(c.get("tokens")))
        if key not in first:
            first[key] = i
            ladder.append(i)
        elif not any(a == first[key] for a, _ in pairs):
            pairs.append((first[key], i))
    return ladder, pairs


KINDS = ("persists", "clean split", "blurred split", "dropped")


def baseline_for(narrow: dict, pairs: list[dict]) -> dict | None:
    """The seed pair a ladder level is read against: same architecture and k, width nearest the level's
    narrow width (the narrower on a tie); None without one."""
    same = [p for p in pairs if p["architecture"] == narrow["architecture"] and p.get("k") == narrow.get("k")]
    if not same:
        return None
    return min(same, key=lambda p: (abs(np.log(p["d_sae"] / narrow["d_sae"])), p["d_sae"]))


def verdict(pairs: list[dict], min_agreement: float) -> dict:
    """Whether the split trees can be read: two seeds of one width must agree on at least `min_agreement`
    of their latents, else a latent's children across widths are mostly seed noise."""
    if not pairs:
        return {
            "readable": None,
            "message": "no same-width seed pair among the SAEs, so nothing says whether these split trees rise "
            "above seed noise; train a second seed (saepipe train --seed 0 1 --seed-widths W) and pass both",
        }
    worst = min(pairs, key=lambda p: p["stability"]["agreement"])
    a = worst["stability"]["agreement"]
    where = f"two seeds of width {worst['d_sae']} agree on {a:.1%} of their latents (decoder |cos| > {worst['stability']['threshold']:g})"
    if a < min_agreement:
        return {
            "readable": False,
            "message": f"SPLIT TREES NOT READABLE: {where}, below {min_agreement:.0%}; most latents are specific to "
            "one seed, so which latent splits into which across widths is mostly noise. Train longer on more "
            "tokens (see bench/bench_stability.py) before reading them",
        }
    return {"readable": True, "message": f"{where} (at least {min_agreement:.0%}): compare each split-tree count "
            "with the same count between the two seeds"}  # fmt: skip
