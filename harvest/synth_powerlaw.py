"""The `powerlaw` recipe of `saepipe synth`: saepipe's own generator (the first lab, issue 5).

- frequencies follow a power law in rank, p_r = freq_max * (r + 1) ** -alpha, with alpha chosen so the
  rarest feature has freq_min; feature index = frequency rank;
- hierarchy (Chanin et al. 2024, "A is for Absorption"): `n_parents` random features get
  `children_per_parent` children each; a child fires only with its parent and siblings are mutually
  exclusive; a present parent carries one child with probability `child_coverage`, shared among the
  children in proportion to their power-law frequencies (so a child's marginal frequency is derived);
- correlation: root features are put in random groups; a group fires a shared event with the frequency of
  its most frequent member, and a fraction `correlation` of each member's occurrences is drawn from the
  group's events; the independent remainder is scaled so every marginal stays exactly p_i;
- magnitudes are mean-1 draws (constant, uniform or lognormal with a given coefficient of variation);
- x = sum_i value_i * direction_i (+ optional isotropic Gaussian noise, added by the generator).

Its hierarchy sits at random frequency ranks (mostly among rare features) and children always carry
their parent; the `synthsaebench` recipe (harvest/synth_bench.py) is the standard benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from saepipe.harvest.config import SynthConfig


@dataclass(frozen=True)
class PowerLawFeatures:
    """The true features; arrays are indexed by feature (index = power-law frequency rank)."""

    cfg: SynthConfig
    directions: np.ndarray  # [n, d] float32, unit rows
    frequencies: np.ndarray  # [n] float64, exact marginal per-token probability
    parent: np.ndarray  # [n] int64, -1 for none
    group: np.ndarray  # [n] int64, -1 for none
    share: np.ndarray  # [n] float64: P(this child | parent present); 0 for non-children
    alpha: float

    @property
    def bias(self) -> np.ndarray:
        return np.zeros(self.directions.shape[1], dtype=np.float32)

    def summary(self) -> dict:
        """Derived values the truth's config.json records."""
        return {"alpha": self.alpha}

    def sample_codes(self, n_tokens: int, seed: tuple[int, ...]) -> sp.csr_matrix:
        return sample_codes(self, self.cfg, n_tokens, np.random.default_rng(list(seed)))


def make_features(cfg: SynthConfig) -> PowerLawFeatures:
    """Directions, power-law frequencies, hierarchy and groups: a pure function of the config."""
    n, rng = cfg.n_features, np.random.default_rng([cfg.seed, 0])
    freq_max, freq_min = cfg.resolved("freq_max"), cfg.resolved("freq_min")
    directions = rng.standard_normal((n, cfg.d_model))
    directions = (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
    alpha = math.log(freq_max / freq_min) / math.log(n)
    freq = freq_max * (np.arange(1, n + 1, dtype=np.float64) ** -alpha)
    parent, group, share = np.full(n, -1), np.full(n, -1), np.zeros(n)
    perm = rng.permutation(n)
    k, n_par = cfg.children_per_parent, cfg.n_parents
    for g, p in enumerate(perm[:n_par]):
        kids = perm[n_par + g * k : n_par + (g + 1) * k]
        parent[kids] = p
        share[kids] = cfg.child_coverage * freq[kids] / freq[kids].sum()
        freq[kids] = freq[p] * share[kids]
    if cfg.correlation > 0:
        roots = rng.permutation(np.flatnonzero(parent < 0))
        group[roots] = np.arange(len(roots)) // cfg.correlation_group_size
    return PowerLawFeatures(cfg, directions, freq, parent, group, share, alpha)


def _bernoulli_positions(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    """Sorted positions in [0, n) of independent Bernoulli(p) successes, in O(successes)."""
    return np.sort(rng.choice(n, size=rng.binomial(n, p), replace=False))


def _magnitudes(rng: np.random.Generator, cfg: SynthConfig, size: int) -> np.ndarray:
    c = cfg.magnitude_cv
    if cfg.magnitude == "constant" or c == 0:
        return np.ones(size)
    if cfg.magnitude == "uniform":
        return rng.uniform(1 - c * math.sqrt(3), 1 + c * math.sqrt(3), size)
    s2 = math.log1p(c * c)
    return rng.lognormal(-s2 / 2, math.sqrt(s2), size)


def sample_codes(
    features: PowerLawFeatures, cfg: SynthConfig, n_tokens: int, rng: np.random.Generator
) -> sp.csr_matrix:
    """True codes of `n_tokens` tokens: CSR [n_tokens, n_features] float32 of the present features' values."""
    n = len(features.frequencies)
    present: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * n
    rho, freq = cfg.correlation, features.frequencies
    events = {}
    if rho > 0:
        for g in np.unique(features.group[features.group >= 0]):
            events[g] = _bernoulli_positions(rng, n_tokens, freq[features.group == g].max())
    for i in np.flatnonzero(features.parent < 0):
        g = features.group[i]
        if g < 0:
            present[i] = _bernoulli_positions(rng, n_tokens, freq[i])
            continue
        # Thin the group's events to rho * p_i, then add independent draws scaled so P(union) = p_i.
        ev = events[g]
        shared = ev[rng.random(len(ev)) < rho * freq[i] / freq[features.group == g].max()]
        own = _bernoulli_positions(rng, n_tokens, (1 - rho) * freq[i] / (1 - rho * freq[i]))
        present[i] = np.union1d(shared, own)
    for p in np.unique(features.parent[features.parent >= 0]):
        kids = np.flatnonzero(features.parent == p)
        u = rng.random(len(present[p]))  # one draw per parent occurrence picks at most one child
        edges = np.cumsum(features.share[kids])
        which = np.searchsorted(edges, u, side="right")
        for j, kid in enumerate(kids):
            present[kid] = present[p][which == j]
    rows = np.concatenate(present)
    cols = np.repeat(np.arange(n), [len(x) for x in present])
    vals = _magnitudes(rng, cfg, len(rows)).astype(np.float32)
    codes = sp.csr_matrix((vals, (rows, cols)), shape=(n_tokens, n), dtype=np.float32)
    codes.sort_indices()
    return codes
