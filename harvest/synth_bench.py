"""The `synthsaebench` recipe of `saepipe synth`: the SynthSAEBench generator (Chanin & Garriga-Alonso 2026,
"SynthSAEBench", arXiv:2602.14687; SAELens `sae_lens.synthetic`), at any (n_features, d_model).

Why: it is the benchmark SAE architectures are compared on; its hierarchy sits among the most frequent
features with mutually exclusive children, so it shows absorption and what Matryoshka SAEs are for.

The model of the data, as published (every number is a `SynthConfig` field):
- firing probabilities: Zipf in rank, r ** -zipf_exponent, rescaled linearly onto [freq_min, freq_max]
  (0.4 .. 5e-4, exponent 0.5); feature index = rank;
- hierarchy: `hierarchy_roots` trees (default n_features / 128) built breadth first from feature 0, so the
  roots are the most frequent features; every node above `hierarchy_depth` (3) has `hierarchy_branching`
  (4) children, all mutually exclusive; a child is active only where its parent is, and its value is
  scaled by parent value / parent mean magnitude; each child's firing probability is raised by
  1 / p_parent * (1 + sum of its siblings' p / p_parent) (clipped at 1) so that gating and exclusion give
  back about its base probability;
- correlation: a Gaussian copula with a low-rank correlation F F^T + diag (F [n, rank 25] ~ N(0, 0.1^2),
  diag = 1 - rowsum F^2): feature i fires where z_i > Phi^-1(1 - p_i);
- magnitudes: relu(mean_i + std_i * N(0, 1)), means linear from 5 (most frequent) to 4, stds folded normal
  |N(0.5, 0.5)|;
- directions: random unit vectors, then `orthogonalize_steps` Adam steps (lr `orthogonalize_lr`) on the
  squared off-diagonal cosines; x = codes @ directions + bias, bias a random vector of norm `bias_norm`.

Where it differs from SAELens (same distribution, different random streams): numpy/torch seeds per
component and per shard instead of one global torch seed; the orthogonalisation's Adam runs in float64
numpy; `frequencies` in the truth are the exact marginals of the model without correlation (computed, not
sampled), which the hierarchy's clipping and exclusion make lower than the base Zipf values for deep
children. Mutual-exclusion winners are drawn uniformly among the active siblings, as in SAELens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import ndtr, ndtri

if TYPE_CHECKING:
    from saepipe.harvest.config import SynthConfig

CHUNK_ELEMENTS = 1 << 24
"""Tokens x features drawn densely at once (64 MiB of float32)."""


@dataclass(frozen=True)
class Level:
    """One depth of the hierarchy: its features and their parents (siblings are mutually exclusive)."""

    features: np.ndarray
    parents: np.ndarray


@dataclass(frozen=True)
class BenchFeatures:
    directions: np.ndarray  # [n, d] float32, unit rows
    frequencies: np.ndarray  # [n] float64, exact marginal (no correlation) of being present
    parent: np.ndarray  # [n] int64, -1 for roots and features outside the hierarchy
    group: np.ndarray  # [n] int64, all -1 (the correlation is low-rank, not grouped)
    bias: np.ndarray  # [d] float32
    base_probability: np.ndarray  # [n] Zipf
    fire_probability: np.ndarray  # [n] after the hierarchy's compensation, clipped at 1
    mean: np.ndarray  # [n] mean magnitude
    std: np.ndarray  # [n] magnitude std
    factor: np.ndarray  # [n, rank] float32 correlation factor
    diag: np.ndarray  # [n] float32, 1 - rowsum(factor ** 2)
    levels: tuple[Level, ...]
    depth: np.ndarray  # [n] int64: 0 for roots and features outside the hierarchy, else the level
    children: np.ndarray  # [n, branching] int64, -1 padded
    scale_children: bool = True

    def summary(self) -> dict:
        roots = int(((self.parent < 0) & np.isin(np.arange(len(self.parent)), self.parent)).sum())
        return {
            "true_l0": float(self.frequencies.sum()),
            "hierarchy_features": int((self.parent >= 0).sum()) + roots,
            "hierarchy_roots": roots,
        }

    def sample_codes(self, n_tokens: int, seed: tuple[int, ...]) -> sp.csr_matrix:
        """True codes CSR [n_tokens, n] float32, drawn in chunks from one torch generator per call."""
        n = len(self.frequencies)
        state = np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & (2**63 - 1))
        chunk = max(1, CHUNK_ELEMENTS // n)
        parts = [self._sample_chunk(min(chunk, n_tokens - s), gen) for s in range(0, n_tokens, chunk)]
        codes = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, n), dtype=np.float32)
        codes.sort_indices()
        return codes

    def _sample_chunk(self, m: int, gen: torch.Generator) -> sp.csr_matrix:
        """Top-level features fire densely through the copula; children are drawn only where their parent is
        active (given the token's copula factor u their draws are independent of everything else, so this
        is the same distribution as drawing all and gating, without drawing the many that gating removes)."""
        n, rank = self.factor.shape
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        threshold = t(ndtri(1 - np.clip(self.fire_probability, 0, 1)).astype(np.float32))
        factor, noise = t(self.factor), t(np.sqrt(self.diag))
        mean, std = t(self.mean.astype(np.float32)), t(self.std.astype(np.float32))
        u = torch.randn(m, rank, generator=gen)
        top = t(np.flatnonzero(self.depth == 0))
        z = torch.randn(m, len(top), generator=gen).mul_(noise[top]).addmm_(u, factor[top].T)
        rows, at = (z > threshold[top]).nonzero(as_tuple=True)
        cols = top[at]
        vals = torch.relu(mean[cols] + std[cols] * torch.randn(len(cols), generator=gen))
        parts = [(rows, cols, vals)]
        kids_of = t(self.children)  # [n, branching], -1 padded
        for _ in self.levels:
            live = (vals > 0) & (kids_of[cols, 0] >= 0)  # active parents with children
            b = kids_of.shape[1]
            par, rows = cols[live].repeat_interleave(b), rows[live].repeat_interleave(b)
            pval, cols = vals[live].repeat_interleave(b), kids_of[cols[live]].reshape(-1)
            ok = cols >= 0
            par, rows, pval, cols = par[ok], rows[ok], pval[ok], cols[ok]
            z = noise[cols] * torch.randn(len(cols), generator=gen) + (u[rows] * factor[cols]).sum(-1)
            fire = z > threshold[cols]
            par, rows, pval, cols = par[fire], rows[fire], pval[fire], cols[fire]
            vals = torch.relu(mean[cols] + std[cols] * torch.randn(len(cols), generator=gen))
            if self.scale_children:
                vals = vals * pval / mean[par]
            # Mutual exclusion: among the active children of one (token, parent) keep one, drawn uniformly.
            act = (vals > 0).nonzero(as_tuple=True)[0]
            group = rows[act] * n + par[act]
            order = torch.rand(len(act), generator=gen).argsort()
            order = order[group[order].argsort(stable=True)]
            first = torch.ones(len(order), dtype=torch.bool)
            first[1:] = group[order][1:] != group[order][:-1]
            keep = act[order[first]]
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
            parts.append((rows, cols, vals))
        rows, cols, vals = (torch.cat(x) for x in zip(*parts))
        keep = vals > 0
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        order = (rows * n + cols).argsort()
        rows, cols, vals = rows[order].numpy(), cols[order].numpy(), vals[order].numpy()
        indptr = np.r_[0, np.cumsum(np.bincount(rows, minlength=m))]
        return sp.csr_matrix((vals, cols, indptr), shape=(m, n), dtype=np.float32)


def zipf_probabilities(n: int, exponent: float, p_max: float, p_min: float) -> np.ndarray:
    """r ** -exponent for ranks 1..n, rescaled linearly onto [p_min, p_max] (SAELens's Zipfian)."""
    p = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    if n == 1:
        return np.array([p_max])
    return p_min + (p_max - p_min) * (p - p.min()) / (p.max() - p.min())


def build_tree(n: int, roots: int, branching: int, depth: int) -> tuple[np.ndarray, list[Level]]:
    """parent [n] and the levels of a breadth-first forest from feature 0; ends when features run out."""
    parent = np.full(n, -1, dtype=np.int64)
    frontier = list(range(min(roots, n)))
    nxt = len(frontier)
    levels = []
    for _ in range(depth):
        feats = []
        for p in frontier:
            kids = list(range(nxt, min(nxt + branching, n)))
            nxt += len(kids)
            parent[kids] = p
            feats += kids
        if not feats:
            break
        f = np.array(feats, dtype=np.int64)
        levels.append(Level(f, parent[f]))
        frontier = feats
    return parent, levels


def compensated(base: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """Firing probabilities raised for gating and exclusion, as SAELens's `compensate_probabilities`."""
    out = base.copy()
    for p in np.unique(parent[parent >= 0]):
        kids = np.flatnonzero(parent == p)
        others = base[kids].sum() - base[kids]
        factor = 1 / base[p] * ((1 + others / base[p]) if len(kids) >= 2 else 1)
        out[kids] = base[kids] * factor
    return np.minimum(out, 1.0)


def exact_marginals(on: np.ndarray, parent: np.ndarray, levels: list[Level]) -> np.ndarray:
    """P(present) per feature without correlation: roots fire with `on`; a child needs its parent present,
    its own draw, and to win the uniform draw among its active siblings (E[1 / (1 + others active)])."""
    out = on.copy()
    for level in levels:
        for p in np.unique(level.parents):
            kids = np.flatnonzero(parent == p)
            for c in kids:
                dist = np.array([1.0])  # Poisson-binomial of the other siblings' active count
                for s in on[kids[kids != c]]:
                    dist = np.convolve(dist, [1 - s, s])
                out[c] = out[p] * on[c] * float((dist / np.arange(1, len(dist) + 1)).sum())
    return out


def orthogonalized(directions: np.ndarray, steps: int, lr: float, chunk: int = 2048) -> np.ndarray:
    """Adam on sum_{i != j} cos_ij^2 + n * sum_i (|d_i|^2 - 1)^2, then unit rows (SAELens's orthogonaliser)."""
    d = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    n = len(d)
    m, v = np.zeros_like(d), np.zeros_like(d)
    for t in range(1, steps + 1):
        sq = (d * d).sum(1)
        grad = np.empty_like(d)
        for s in range(0, n, chunk):
            gram = d[s : s + chunk] @ d.T  # [c, n]
            grad[s : s + chunk] = 4 * (gram @ d - sq[s : s + chunk, None] * d[s : s + chunk])
        grad += 4 * n * (sq - 1)[:, None] * d
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        d = d - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def make_features(cfg: SynthConfig) -> BenchFeatures:
    """Every array of the model: a pure function of the config (numpy generators seeded per component)."""
    n, dim = cfg.n_features, cfg.d_model
    rng = lambda k: np.random.default_rng([cfg.seed, 100 + k])  # noqa: E731
    base = zipf_probabilities(n, cfg.zipf_exponent, cfg.resolved("freq_max"), cfg.resolved("freq_min"))
    roots = cfg.hierarchy_roots if cfg.hierarchy_roots is not None else n // 128
    parent, levels = build_tree(n, roots, cfg.hierarchy_branching, cfg.hierarchy_depth)
    fire = compensated(base, parent)
    mean = np.linspace(cfg.magnitude_mean_start, cfg.magnitude_mean_end, n)
    std = np.abs(rng(1).normal(cfg.magnitude_std_mean, cfg.magnitude_std_std, n))
    positive = np.where(std > 0, ndtr(mean / np.where(std > 0, std, 1)), (mean > 0).astype(float))
    factor = rng(2).standard_normal((n, cfg.correlation_rank)) * cfg.correlation_scale
    rows = (factor**2).sum(1)
    if rows.size and rows.max() > 0.99:  # keep every diagonal term >= 0.01, as SAELens does
        factor *= np.sqrt(0.99 / rows.max())
    diag = 1 - (factor**2).sum(1)
    directions = orthogonalized(
        rng(3).standard_normal((n, dim)), cfg.orthogonalize_steps, cfg.orthogonalize_lr
    )
    bias = rng(4).standard_normal(dim)
    bias *= cfg.bias_norm / max(np.linalg.norm(bias), 1e-12)
    return BenchFeatures(
        directions=directions.astype(np.float32),
        frequencies=exact_marginals(fire * positive, parent, levels),
        parent=parent,
        group=np.full(n, -1, dtype=np.int64),
        bias=bias.astype(np.float32),
        base_probability=base,
        fire_probability=fire,
        mean=mean,
        std=std,
        factor=factor.astype(np.float32),
        diag=diag.astype(np.float32),
        levels=tuple(levels),
        depth=_depths(parent),
        children=_children(parent, cfg.hierarchy_branching),
    )


def _children(parent: np.ndarray, branching: int) -> np.ndarray:
    out = np.full((len(parent), max(branching, 1)), -1, dtype=np.int64)
    for p in np.unique(parent[parent >= 0]):
        kids = np.flatnonzero(parent == p)
        out[p, : len(kids)] = kids
    return out


def _depths(parent: np.ndarray) -> np.ndarray:
    depth = np.zeros(len(parent), dtype=np.int64)
    for i in np.flatnonzero(parent >= 0):  # parents precede their children (breadth-first numbering)
        depth[i] = depth[parent[i]] + 1
    return depth
