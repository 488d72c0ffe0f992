"""Absorption on the hierarchy of a synthetic set: where a parent's latent goes silent and who took over.

Why (Chanin et al. 2024, "A is for Absorption"): when a child feature always comes with its parent, a
sparse code saves an active latent by folding the parent's direction into the child's latent, which then
fires in the parent latent's place. The parent looks recovered by its direction, yet it is missing exactly
where its children are. Reconstruction cannot see this; the truth can.

For every parent feature p (a feature that has children) with latent L_p (its best-cosine latent):
    child_tokens[p]  tokens where some child of p is present (p is present there too, by construction)
    silent[p]        of those, tokens where L_p does not fire
    rate[p]          silent / child_tokens: 0 for a parent kept where its children are, 1 for one absorbed
    takers[p]        the latents that fire most often on the silent tokens, each with how often and its
                     decoder cosine to p's direction (an absorbing latent carries p's direction)
All are token counts, additive over batches, so a store of any size is scored in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

Latents = np.ndarray | sp.spmatrix


def parents_of(parent: np.ndarray) -> np.ndarray:
    """Sorted feature ids that have at least one child."""
    return np.unique(parent[parent >= 0])


@dataclass
class AbsorptionCounts:
    parents: np.ndarray  # [P] feature ids
    latents: np.ndarray  # [P] each parent's latent
    child_tokens: np.ndarray  # [P] int64
    silent: np.ndarray  # [P] int64
    takers: sp.csr_matrix  # [P, d_sae] int64: latent fires on a silent token of the parent


class AbsorptionAccumulator:
    """Streams (true codes CSR [N, n], latent activations [N, d_sae]) batches into `AbsorptionCounts`."""

    def __init__(self, parent: np.ndarray, parent_latent: np.ndarray, d_sae: int):
        self.parents = parents_of(parent)
        kids = np.flatnonzero(parent >= 0)
        col = np.searchsorted(self.parents, parent[kids])
        self.child_to_parent = sp.csr_matrix(
            (np.ones(len(kids)), (kids, col)), shape=(len(parent), len(self.parents))
        )
        P = len(self.parents)
        self.counts = AbsorptionCounts(
            self.parents,
            np.asarray(parent_latent, dtype=np.int64)[self.parents],
            np.zeros(P, dtype=np.int64),
            np.zeros(P, dtype=np.int64),
            sp.csr_matrix((P, d_sae), dtype=np.int64),
        )

    def update(self, codes: sp.csr_matrix, latent_acts: Latents) -> None:
        if not len(self.parents):
            return
        present = sp.csr_matrix(codes != 0).astype(np.float64)
        child_here = (present @ self.child_to_parent) > 0  # [N, P]
        lat = latent_acts[:, self.counts.latents]
        lat_fires = (lat.toarray() if sp.issparse(lat) else np.asarray(lat)) > 0  # [N, P]
        silent = sp.csr_matrix(child_here.multiply(sp.csr_matrix(~lat_fires)))  # [N, P]
        fires = sp.csr_matrix(latent_acts > 0).astype(np.int64)
        c = self.counts
        c.child_tokens += np.asarray(child_here.sum(axis=0)).ravel().astype(np.int64)
        c.silent += np.asarray(silent.sum(axis=0)).ravel().astype(np.int64)
        c.takers = (c.takers + (silent.T.astype(np.int64) @ fires)).tocsr()


def absorption_report(counts: AbsorptionCounts, cos: np.ndarray, feature_of_latent: np.ndarray, top: int = 3):
    """Per parent: its latent, rate and top `top` takers; plus the mean rate over parents seen with children.

    `cos` [n, d_sae] is the feature-latent decoder cosine; `feature_of_latent` [d_sae] each latent's
    best-cosine feature (to name what a taker is)."""
    rows = []
    for i, p in enumerate(counts.parents.tolist()):
        n, s = int(counts.child_tokens[i]), int(counts.silent[i])
        row = counts.takers.getrow(i)
        order = np.argsort(-row.data, kind="stable")[:top]
        rows.append(
            {
                "parent": p,
                "parent_latent": int(counts.latents[i]),
                "parent_latent_cos": float(cos[p, counts.latents[i]]),
                "child_tokens": n,
                "silent_tokens": s,
                "absorption_rate": s / n if n else float("nan"),
                "takers": [
                    {
                        "latent": int(row.indices[j]),
                        "fraction_of_silent": float(row.data[j] / s) if s else 0.0,
                        "cos_to_parent": float(cos[p, row.indices[j]]),
                        "latent_feature": int(feature_of_latent[row.indices[j]]),
                    }
                    for j in order
                ],
            }
        )
    seen = [r["absorption_rate"] for r in rows if r["child_tokens"]]
    return rows, (float(np.mean(seen)) if seen else float("nan"))
