"""Token counts and sums behind split families (issue 13), accumulated over streamed batches.

Every class here is additive over batches (`update` per batch), so a store of any size is measured in one
pass, and a batch split differently gives the same sums. Two passes over the store:

1. `LatentStats` (before families exist): per wide latent its firing count, activation mass (sum z) and
   sum z^2; on the candidate pairs (saepipe.analyze.families.candidate_pairs) the tokens where both fire
   and sum z_i z_j; and the moments the merged encoder is fitted from (X~ = [x - b_dec, 1]):
   X~^T X~ [d+1, d+1] and X~^T Z [m, d+1].
2. `FamilyStats` (one per cut, families fixed): per family, with a_F = sum_{i in F} w_i z_i,
     fires      tokens where some member fires;  cofire: tokens where two or more do (question: does a
                one-layer encoder make siblings fire together anyway?), `sibling_cofire` = cofire / fires
     mass       sum a_F;  energy: sum |r_F|^2 with r_F = sum_{i in F} z_i d_i, the family's part of the
                wide reconstruction; `energy_kept` = sum a_F^2 / energy (1: one direction says it all)
     parent     with a ladder, the parent latent's activation mass and the part of it on tokens where the
                family fires (`parent_mass_covered`)
     fit        on tokens where the family fires, sums of p and a_F for the 1-D affine fit of the
                merged encoder (saepipe.analyze.merge)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from saepipe.analyze.families import Candidates, MergedDecoder


def _col(m: sp.spmatrix | np.ndarray) -> np.ndarray:
    return np.asarray(m.sum(axis=0)).ravel()


def _pair_values(prod: sp.spmatrix, pairs: Candidates, m: int) -> np.ndarray:
    """prod [m, m] read at the candidate pairs (0 where absent)."""
    coo = sp.triu(prod, k=1).tocoo()
    keys = coo.row.astype(np.int64) * m + coo.col
    want = pairs.i * m + pairs.j
    order = np.argsort(keys)
    keys, vals = keys[order], coo.data[order]
    at = np.searchsorted(keys, want)
    hit = at < len(keys)
    hit[hit] = keys[at[hit]] == want[hit]
    out = np.zeros(len(want), dtype=np.float64)
    out[hit] = vals[at[hit]]
    return out


@dataclass
class LatentStats:
    """Pass 1 sums over tokens for a wide SAE of m latents on d-dimensional inputs."""

    pairs: Candidates
    m: int
    d: int
    n_tokens: int = 0
    fires: np.ndarray = field(init=False)  # [m] int64
    mass: np.ndarray = field(init=False)  # [m] sum z
    sq: np.ndarray = field(init=False)  # [m] sum z^2
    co: np.ndarray = field(init=False)  # [P] tokens where both fire
    gram: np.ndarray = field(init=False)  # [P] sum z_i z_j
    xx: np.ndarray = field(init=False)  # [d+1, d+1]
    xz: np.ndarray = field(init=False)  # [m, d+1]

    def __post_init__(self) -> None:
        P = len(self.pairs.i)
        self.fires = np.zeros(self.m, np.int64)
        self.mass, self.sq = np.zeros(self.m), np.zeros(self.m)
        self.co, self.gram = np.zeros(P, np.int64), np.zeros(P)
        self.xx = np.zeros((self.d + 1, self.d + 1))
        self.xz = np.zeros((self.m, self.d + 1))

    def update(self, x_c: np.ndarray, z: sp.csr_matrix) -> None:
        """x_c [N, d]: inputs minus the wide SAE's b_dec; z [N, m] its code."""
        z = sp.csr_matrix(z, dtype=np.float64)
        z.eliminate_zeros()
        fb = z.copy()
        fb.data[:] = 1.0
        xt = np.hstack([x_c.astype(np.float64), np.ones((len(x_c), 1))])
        self.n_tokens += len(x_c)
        self.fires += _col(fb).astype(np.int64)
        self.mass += _col(z)
        self.sq += _col(z.multiply(z))
        if len(self.pairs.i):
            self.co += np.rint(_pair_values((fb.T @ fb).tocsr(), self.pairs, self.m)).astype(np.int64)
            self.gram += _pair_values((z.T @ z).tocsr(), self.pairs, self.m)
        self.xx += xt.T @ xt
        self.xz += np.asarray(z.T @ xt)


def weight_matrix(md: MergedDecoder, values: np.ndarray | None = None) -> sp.csr_matrix:
    """W [m, n_families] with w_i (or `values`) at (i, family(i)), rows of left-out latents empty: the
    exact family code is a = z @ W."""
    m = len(md.family)
    live = np.flatnonzero(md.family >= 0)
    v = (md.weight if values is None else values)[live]
    return sp.csr_matrix((v, (live, md.family[live])), shape=(m, len(md.decoder)))


@dataclass
class FamilyStats:
    """Pass 2 sums for one cut (module doc); `fit` is the fitted direction p = X~ e for families of two or
    more, `parent` [n_families] the ladder parent latent of each family (-1 for none) or None."""

    md: MergedDecoder
    decoder: np.ndarray  # [m, d] the wide SAE's rows
    fit: np.ndarray  # [d+1, n_families] (columns of families of one are unused)
    parent: np.ndarray | None = None
    n_tokens: int = 0
    fires: np.ndarray = field(init=False)
    cofire: np.ndarray = field(init=False)
    mass: np.ndarray = field(init=False)
    a_sq: np.ndarray = field(init=False)
    energy: np.ndarray = field(init=False)
    parent_mass: np.ndarray = field(init=False)
    parent_covered: np.ndarray = field(init=False)
    p_sum: np.ndarray = field(init=False)
    p_sq: np.ndarray = field(init=False)
    ap_sum: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.md.decoder)
        for name in ("mass", "a_sq", "energy", "parent_mass", "parent_covered", "p_sum", "p_sq", "ap_sum"):
            setattr(self, name, np.zeros(n))
        self.fires, self.cofire = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.W = weight_matrix(self.md)
        self.M = weight_matrix(self.md, np.ones(len(self.md.family)))
        self.multi = np.flatnonzero(self.md.sizes > 1)
        self.norm_sq = (self.decoder.astype(np.float64) ** 2).sum(1)

    def codes(self, z: sp.csr_matrix) -> sp.csr_matrix:
        """The exact family code a [N, n_families] = z @ W."""
        a = (sp.csr_matrix(z, dtype=np.float64) @ self.W).tocsr()
        a.eliminate_zeros()
        return a

    def update(
        self, x_c: np.ndarray, z: sp.csr_matrix, parent_acts: sp.spmatrix | None = None
    ) -> sp.csr_matrix:
        """One batch (x_c, z as in LatentStats.update; parent_acts [N, m_parent] the ladder parent SAE's
        code); returns the exact family code of the batch."""
        z = sp.csr_matrix(z, dtype=np.float64)
        z.eliminate_zeros()
        a = self.codes(z)
        fb = z.copy()
        fb.data[:] = 1.0
        k = (fb @ self.M).tocsr()
        self.n_tokens += z.shape[0]
        self.fires += _col(k > 0).astype(np.int64)
        self.cofire += _col(k >= 2).astype(np.int64)
        self.mass += _col(a)
        self.a_sq += _col(a.multiply(a))
        self.energy += self._energy(z)
        if len(self.multi):
            xt = np.hstack([x_c.astype(np.float64), np.ones((len(x_c), 1))])
            am = a[:, self.multi].tocoo()
            p = (xt @ self.fit[:, self.multi])[am.row, am.col]  # [N, n_multi] then the active entries
            col = self.multi[am.col]
            np.add.at(self.p_sum, col, p)
            np.add.at(self.p_sq, col, p * p)
            np.add.at(self.ap_sum, col, am.data * p)
        if parent_acts is not None and self.parent is not None:
            has = np.flatnonzero(self.parent >= 0)
            pa = sp.csr_matrix(parent_acts, dtype=np.float64)[:, self.parent[has]]
            self.parent_mass[has] += _col(pa)
            self.parent_covered[has] += _col(pa.multiply(a[:, has] > 0))
        return a

    def _energy(self, z: sp.csr_matrix) -> np.ndarray:
        """Per family, sum over tokens of |sum_{i in F} z_i d_i|^2 (exact, including co-firing members)."""
        coo = z.tocoo()
        keep = self.md.family[coo.col] >= 0
        coo = sp.coo_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=coo.shape)
        fam = self.md.family[coo.col]
        out = np.bincount(fam, weights=coo.data**2 * self.norm_sq[coo.col], minlength=len(self.md.decoder))
        key = coo.row.astype(np.int64) * len(self.md.decoder) + fam
        uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
        shared = counts[inv] > 1  # (token, family) groups with two or more members firing: add cross terms
        if shared.any():
            g, gi = np.unique(inv[shared], return_inverse=True)
            r = np.zeros((len(g), self.decoder.shape[1]))
            np.add.at(r, gi, coo.data[shared, None] * self.decoder[coo.col[shared]])
            fam_g = (uniq[g] % len(self.md.decoder)).astype(np.int64)
            single = np.bincount(
                gi, weights=coo.data[shared] ** 2 * self.norm_sq[coo.col[shared]], minlength=len(g)
            )
            np.add.at(out, fam_g, (r * r).sum(1) - single)
        return out

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(alpha, beta) [n_families]: a_F ~ alpha p + beta by least squares on the tokens where F fires
        (1, 0 where undefined or for families of one)."""
        n = np.maximum(self.fires.astype(np.float64), 1)
        mp, ma = self.p_sum / n, self.mass / n
        var = self.p_sq / n - mp * mp
        cov = self.ap_sum / n - mp * ma
        ok = (var > 1e-12 * np.maximum(self.p_sq / n, 1e-300)) & (self.md.sizes > 1) & (self.fires > 1)
        alpha = np.where(ok, cov / np.where(ok, var, 1), 1.0)
        beta = np.where(ok, ma - alpha * mp, 0.0)
        return alpha, beta

    def summary(self, f: int) -> dict:
        fires = int(self.fires[f])
        out = {
            "fires": fires,
            "mass": float(self.mass[f]),
            "sibling_cofire": float(self.cofire[f] / fires) if fires else 0.0,
            "energy_kept": float(self.a_sq[f] / self.energy[f]) if self.energy[f] > 0 else 1.0,
        }
        if self.parent is not None and self.parent[f] >= 0:
            pm = self.parent_mass[f]
            out["parent_mass_covered"] = float(self.parent_covered[f] / pm) if pm > 0 else 0.0
        return out
