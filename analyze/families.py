"""Split families: group the latents of one wide SAE into families that split one feature (issue 13).

Why: erring towards too wide a dictionary is the safer side (a feature cut into pieces can still be used),
provided the pieces can be put back together. A family is a set of wide latents that split one parent:
their decoder directions share the parent's direction and, as siblings of a split, they rarely fire on
the same token. Everything here is a pure function of arrays; the streamed counts come from
saepipe.analyze.family_stats and the command lives in saepipe.analyze.families_cmd.

Evidence and how it is combined:
- candidates: latent pairs (i, j) whose decoder cosine is at least `candidate_cos`, both alive;
- exclusion: co[i, j] = tokens where both fire. Two clusters A, B may merge only if
  cofire(A, B) = sum of co over candidate pairs between them / min(fires_A, fires_B) <= `max_cofire`,
  where fires_A sums its members' firing counts (exact when members are exclusive). Siblings that fire
  together are a composition, not a split, and are never merged; how often a one-layer encoder makes
  true siblings fire together anyway is measured per family afterwards (family_stats.FamilyStats);
- ladder: when narrower SAEs are given, each wide latent's ancestor in the narrowest one (through the split
  links of saepipe.analyze.splitting.link_latents, level by level) must be shared: only latents that
  descend from the same parent merge, and latents with no ancestor stay alone;
- linkage: clusters merge greedily, best score first, where score(A, B) = cos(s_A, s_B) and s_A =
  sum over members of mass_i * d_i / |d_i| (mass_i: the latent's summed activation), the direction the
  merged latent would carry. Merging stops at a cosine `threshold` or at a number of families (`width`);
  one run to the furthest cut records the order of merges, and every cut replays a prefix of it;
- latents that never fire on the measured tokens are left out (family -1): they carry nothing a merged
  latent could keep, and an over-complete TopK SAE can hold thousands of them, which would otherwise
  stand between a merge and its target width.

A family's merged latent (saepipe.analyze.merge): decoder row u_F, activation a_F(x) = sum_{i in F} w_i
z_i(x) with w_i = d_i . u_F, the projection of the family's reconstruction sum_i z_i d_i onto u_F, so that
a_F u_F is the closest reconstruction along u_F (exact for a family of one: u = d_i, w = 1). u_F is, by
`direction`: "mean", the unit s_F above; or "refit", the top principal direction of the family's
reconstructions sum_t r_t r_t^T = D_F^T G_F D_F (G: the members' activation Gram over the store), the u
that keeps the most reconstruction energy.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from saepipe.analyze.recovery import cosine_matrix


@dataclass(frozen=True)
class Candidates:
    """Latent pairs that may link, i < j, sorted by (i, j)."""

    i: np.ndarray  # [P] int64
    j: np.ndarray  # [P] int64
    cos: np.ndarray  # [P] float64 decoder cosine


def candidate_pairs(
    decoder: np.ndarray, min_cos: float, ancestor: np.ndarray | None = None, block: int = 4096
) -> Candidates:
    """Pairs i < j with decoder cosine >= min_cos (and, given `ancestor` [m], the same ancestor >= 0)."""
    m = len(decoder)
    parts_i, parts_j, parts_c = [], [], []
    for s in range(0, m, block):
        c = cosine_matrix(decoder[s : s + block], decoder)  # [b, m]
        i, j = np.nonzero(c >= min_cos)
        i = i + s
        keep = i < j
        parts_i.append(i[keep])
        parts_j.append(j[keep])
        parts_c.append(c[i[keep] - s, j[keep]])
    i, j, c = (np.concatenate(p) if p else np.zeros(0) for p in (parts_i, parts_j, parts_c))
    i, j = i.astype(np.int64), j.astype(np.int64)
    if ancestor is not None:
        keep = (ancestor[i] >= 0) & (ancestor[i] == ancestor[j])
        i, j, c = i[keep], j[keep], c[keep]
    order = np.lexsort((j, i))
    return Candidates(i[order], j[order], c[order].astype(np.float64))


@dataclass(frozen=True)
class Merge:
    a: int
    b: int
    """The two clusters merged (ids < m are latents; cluster m + n is the one made by merge n)."""
    score: float
    """Cosine between their directions when they merged."""
    cofire: float
    """Their co-firing fraction when they merged (<= max_cofire)."""


def agglomerate(
    decoder: np.ndarray,
    mass: np.ndarray,
    fires: np.ndarray,
    pairs: Candidates,
    co: np.ndarray,
    max_cofire: float,
    min_score: float,
    min_families: int = 1,
) -> list[Merge]:
    """Greedy merges, best centroid cosine first, of clusters linked by candidate pairs (module doc).

    decoder [m, d]; mass, fires [m] (latents with no firing never merge); pairs with co [P] (tokens where
    both fire). Stops when no allowed pair scores >= min_score or `min_families` clusters remain."""
    m = len(decoder)
    unit = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    s = np.zeros((2 * m, decoder.shape[1]))
    s[:m] = unit * mass[:, None]
    fire = np.zeros(2 * m)
    fire[:m] = fires
    alive = np.zeros(2 * m, bool)
    alive[:m] = True
    nbr: dict[int, dict[int, float]] = {}
    heap: list[tuple[float, int, int]] = []

    def norm(v: np.ndarray) -> float:
        return float(np.sqrt(v @ v))

    def allowed(a: int, b: int, c: float) -> float | None:
        low = min(fire[a], fire[b])
        return c / low if low > 0 and c / low <= max_cofire else None

    ok = (fires[pairs.i] > 0) & (fires[pairs.j] > 0)
    for a, b, c in zip(pairs.i[ok].tolist(), pairs.j[ok].tolist(), co[ok].tolist()):
        nbr.setdefault(a, {})[b] = c
        nbr.setdefault(b, {})[a] = c
    norms = np.array([norm(v) for v in s[:m]])
    for a, b in zip(pairs.i[ok].tolist(), pairs.j[ok].tolist()):
        score = float(s[a] @ s[b]) / max(norms[a] * norms[b], 1e-300)
        if score >= min_score and allowed(a, b, nbr[a][b]) is not None:
            heap.append((-score, a, b))
    heapq.heapify(heap)
    merges: list[Merge] = []
    n_alive = int((fires > 0).sum())  # latents that never fired are left out of every cut
    while heap and n_alive > min_families:
        neg, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]):
            continue
        cofire = allowed(a, b, nbr[a][b])
        c = m + len(merges)
        merges.append(Merge(a, b, -neg, float(cofire or 0.0)))
        alive[a] = alive[b] = False
        alive[c] = True
        n_alive -= 1
        s[c] = s[a] + s[b]
        fire[c] = fire[a] + fire[b]
        joined: dict[int, float] = {}
        for old in (a, b):
            for n, v in nbr.pop(old).items():
                if n not in (a, b):
                    joined[n] = joined.get(n, 0.0) + v
                    del nbr[n][old]
        nbr[c] = joined
        sc = norm(s[c])
        for n, v in joined.items():
            nbr[n][c] = v
            score = float(s[c] @ s[n]) / max(sc * norm(s[n]), 1e-300)
            if score >= min_score and allowed(c, n, v) is not None:
                heapq.heappush(heap, (-score, min(c, n), max(c, n)))
    return merges


def cut(
    merges: list[Merge],
    m: int,
    threshold: float | None = None,
    width: int | None = None,
    live: np.ndarray | None = None,
) -> np.ndarray:
    """family [m] int64 after replaying merges until one scores below `threshold` or `width` families
    remain. Families are numbered by their smallest member, so an SAE with no merges keeps its order.
    Latents outside `live` [m] bool (those that never fired) get family -1: left out, not counted."""
    live = np.ones(m, bool) if live is None else live
    root = np.arange(2 * m)
    n = int(live.sum())
    for step, mg in enumerate(merges):
        if (threshold is not None and mg.score < threshold) or (width is not None and n <= width):
            break
        root[mg.a] = root[mg.b] = m + step
        n -= 1
    for c in range(2 * m - 1, -1, -1):  # children point to their parent; resolve top-down
        if root[c] != c:
            root[c] = root[root[c]]
    top = root[:m][live]
    firsts = np.unique(top, return_index=True)[1]  # smallest member per family (first occurrence)
    order = np.argsort(firsts)
    label = np.empty(len(firsts), dtype=np.int64)
    label[order] = np.arange(len(firsts))
    family = np.full(m, -1, dtype=np.int64)
    family[live] = label[np.unique(top, return_inverse=True)[1]]
    return family


def ancestors(links: list[np.ndarray]) -> np.ndarray:
    """Each wide latent's ancestor in the narrowest SAE, from per-level parent arrays (narrow to wide:
    links[a] [m_{a+1}] gives the parent in SAE a, -1 for none); -1 where the chain breaks."""
    anc = links[-1].copy()
    for parent in reversed(links[:-1]):
        anc = np.where(anc >= 0, parent[np.maximum(anc, 0)], -1)
    return anc


@dataclass(frozen=True)
class MergedDecoder:
    """One cut's merged dictionary, as functions of the wide SAE's code z [N, m]."""

    family: np.ndarray  # [m] family of each latent, -1 for one left out (it never fired)
    weight: np.ndarray  # [m] w_i: a_F = sum_{i in F} w_i z_i (0 for a latent left out)
    decoder: np.ndarray  # [n_families, d] u_F (a family of one keeps its own row)
    sizes: np.ndarray  # [n_families] members per family


def merged_decoder(
    decoder: np.ndarray,
    mass: np.ndarray,
    family: np.ndarray,
    direction: str = "refit",
    gram: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    sq: np.ndarray | None = None,
) -> MergedDecoder:
    """u_F and w_i for every family (module doc). "refit" needs the members' activation Gram: `sq` [m]
    (sum z_i^2) and `gram` (i, j, sum z_i z_j) over pairs; pairs not given count as never co-active."""
    live = np.flatnonzero(family >= 0)
    n_fam = int(family.max()) + 1 if len(live) else 0
    sizes = np.bincount(family[live], minlength=n_fam)
    first = live[np.unique(family[live], return_index=True)[1]]  # smallest member of each family
    out = decoder.astype(np.float64)[first].copy()
    weight = np.where(family >= 0, 1.0, 0.0)
    unit = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    multi = np.flatnonzero(sizes > 1)
    by_family = live[np.argsort(family[live], kind="stable")]
    starts = np.r_[0, np.cumsum(sizes)]
    members = {f: by_family[starts[f] : starts[f + 1]] for f in multi.tolist()}
    if direction == "refit":
        if gram is None or sq is None:
            raise ValueError("direction 'refit' needs the activation Gram (sq and gram)")
        gi, gj, gv = gram
        same = np.flatnonzero((family[gi] == family[gj]) & (family[gi] >= 0))
        same = same[np.argsort(family[gi[same]], kind="stable")]
        bounds = np.searchsorted(family[gi[same]], [multi, multi + 1]) if len(multi) else None
    elif direction != "mean":
        raise ValueError(f"unknown direction {direction!r}")
    for k, (f, idx) in enumerate(members.items()):
        if direction == "mean":
            u = (unit[idx] * mass[idx, None]).sum(0)
        else:
            G = np.diag(sq[idx].astype(np.float64))
            pick = same[bounds[0][k] : bounds[1][k]]
            a, b = np.searchsorted(idx, gi[pick]), np.searchsorted(idx, gj[pick])
            G[a, b] = G[b, a] = gv[pick]
            D = decoder[idx].astype(np.float64)
            vals, vecs = np.linalg.eigh(G)
            A = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T @ D  # G^1/2 D: A^T A = D^T G D
            u = np.linalg.svd(A, full_matrices=False)[2][0]
            if (D @ u * mass[idx]).sum() < 0:
                u = -u
        u = u / max(np.linalg.norm(u), 1e-12)
        out[f] = u
        weight[idx] = decoder[idx].astype(np.float64) @ u
    return MergedDecoder(family, weight, out, sizes)
