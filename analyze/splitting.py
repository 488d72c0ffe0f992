"""Split trees across a width ladder, and the sparsity-reconstruction frontier (issue 5).

Why: as width grows a latent may split into finer latents; a researcher needs to see which latents split
into which, whether the split is clean (children partition the parent's firing) or a blur (children fire
together, the encoder's imperfect sparsity among near-parallel directions), and what width bought in
L0 and FVU.

Links, between each SAE of the ladder (sorted by width) and the next wider one: a wide latent j is a child
of the narrow latent i that maximises cos(i, j) * containment(i, j), among those with decoder cosine >=
`min_cos` and containment = (tokens where both fire) / (tokens where j fires) >= `min_coactivation`; a
wide latent with no such i is `new`. Per parent, over the same tokens:
- share of each child = both fire / parent fires; `coverage` = parent fires and some child fires / parent
  fires; `overlap` = parent fires and two or more children fire / parent fires; `leak` = some child fires
  while the parent is silent / tokens where some child fires;
- `sibling_cofire` = tokens where two or more siblings fire / tokens where at least one fires (question 2),
  and over all parents the histogram of how many siblings fire on one token;
- `kind`: dropped (no child), persists (one child), clean split (two or more, overlap <= `clean_overlap`),
  blurred split (more overlap).
Seed baseline (issue 19): SAEs of the same architecture, width and k (`saepipe train --seed 0 1`) are
replicates; the first stays in the ladder and the second is linked to it exactly like a level. Their
agreement (saepipe.analyze.stability: latents found again at decoder |cos| > 0.7, plain and weighted by
firing, against random directions) and their split-tree counts are what seed noise alone gives, and
every level is reported next to them (`seed_baseline`); `verdict` says plainly when two seeds agree on
fewer than `min_agreement` of their latents, i.e. when the trees are at noise level.
Two passes over the store: the first counts co-firing (and the frontier's L0/FVU, and each latent's top
contexts for the pages), the second, with the links fixed, counts per-token sibling statistics. On a store
from a real model the frontier also gets each SAE's loss recovered from `saepipe evaluate`
(saepipe.analyze.frontier.spliced_metrics), and OUT/index.html shows per parent its children's top contexts
side by side (saepipe.analyze.split_pages).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from saepipe.analyze.config import SplittingConfig
from saepipe.analyze.recovery import cosine_matrix
from saepipe.errors import SaepipeError


@dataclass
class CoFiring:
    """Token counts between a narrow SAE (a) and a wider one (b); additive over batches."""

    fires_a: np.ndarray  # [m_a] int64
    fires_b: np.ndarray  # [m_b] int64
    co: sp.csr_matrix  # [m_a, m_b] int64: both fire on the same token

    def __add__(self, other: CoFiring) -> CoFiring:
        return CoFiring(
            self.fires_a + other.fires_a, self.fires_b + other.fires_b, (self.co + other.co).tocsr()
        )


def _fires(latents: np.ndarray | sp.spmatrix) -> sp.csr_matrix:
    return sp.csr_matrix(latents > 0).astype(np.int64)


def cofiring(lat_a: np.ndarray | sp.spmatrix, lat_b: np.ndarray | sp.spmatrix) -> CoFiring:
    """Counts over one batch of latent activations [N, m_a] and [N, m_b] (fires = value > 0)."""
    fa, fb = _fires(lat_a), _fires(lat_b)
    return CoFiring(np.asarray(fa.sum(0)).ravel(), np.asarray(fb.sum(0)).ravel(), (fa.T @ fb).tocsr())


def link_latents(cos: np.ndarray, counts: CoFiring, min_cos: float, min_coactivation: float) -> np.ndarray:
    """parent [m_b] int64: the narrow latent each wide latent descends from, -1 for none (see module doc)."""
    co = counts.co.tocoo()
    i, j = co.row, co.col
    containment = co.data / np.maximum(counts.fires_b[j], 1)
    c = cos[i, j]
    ok = (c >= min_cos) & (containment >= min_coactivation)
    i, j, score = i[ok], j[ok], (c * containment)[ok]
    parent = np.full(cos.shape[1], -1)
    order = np.lexsort((-score, j))  # per child, best score first
    first = np.r_[True, j[order][1:] != j[order][:-1]] if len(order) else np.zeros(0, bool)
    parent[j[order][first]] = i[order][first]
    return parent


@dataclass
class SiblingCounts:
    """Per-parent token counts with the links fixed; additive over batches."""

    any_child: np.ndarray  # [m_a]: some child fires
    two_children: np.ndarray  # [m_a]: two or more children fire
    covered: np.ndarray  # [m_a]: parent and some child fire
    overlap: np.ndarray  # [m_a]: parent and two or more children fire
    histogram: np.ndarray  # [max_children + 1]: tokens by number of siblings firing (>= 1), over all parents

    def __add__(self, o: SiblingCounts) -> SiblingCounts:
        h = np.zeros(max(len(self.histogram), len(o.histogram)), dtype=np.int64)
        h[: len(self.histogram)] += self.histogram
        h[: len(o.histogram)] += o.histogram
        return SiblingCounts(
            self.any_child + o.any_child,
            self.two_children + o.two_children,
            self.covered + o.covered,
            self.overlap + o.overlap,
            h,
        )


def sibling_counts(
    lat_a: np.ndarray | sp.spmatrix, lat_b: np.ndarray | sp.spmatrix, parent: np.ndarray
) -> SiblingCounts:
    """Per token and parent, how many of its children fire: K = fires_b @ membership [N, m_a]."""
    m_a = lat_a.shape[1]
    kids = np.flatnonzero(parent >= 0)
    member = sp.csr_matrix(
        (np.ones(len(kids), dtype=np.int64), (kids, parent[kids])), shape=(len(parent), m_a)
    )
    k = (_fires(lat_b) @ member).tocsr()
    k.eliminate_zeros()
    fa = _fires(lat_a)
    ge1 = (k >= 1).astype(np.int64)
    ge2 = (k >= 2).astype(np.int64)
    col = lambda m: np.asarray(m.sum(0)).ravel().astype(np.int64)  # noqa: E731
    return SiblingCounts(
        col(ge1), col(ge2), col(fa.multiply(ge1)), col(fa.multiply(ge2)), np.bincount(k.data.astype(np.int64))
    )


def _kind(n_children: int, overlap: float, clean_overlap: float) -> str:
    if n_children == 0:
        return "dropped"
    if n_children == 1:
        return "persists"
    return "clean split" if overlap <= clean_overlap else "blurred split"


def split_tree(
    cos: np.ndarray, counts: CoFiring, parent: np.ndarray, sib: SiblingCounts, clean_overlap: float
) -> dict:
    """The report of one level of the ladder: per narrow latent its children and split statistics."""
    co = counts.co.tocsr()
    parents = []
    for i in range(cos.shape[0]):
        kids = np.flatnonzero(parent == i)
        fa = int(counts.fires_a[i])
        children = [
            {
                "latent": int(j),
                "cos": float(cos[i, j]),
                "fires": int(counts.fires_b[j]),
                "share": float(co[i, j] / fa) if fa else 0.0,
                "containment": float(co[i, j] / counts.fires_b[j]) if counts.fires_b[j] else 0.0,
            }
            for j in kids
        ]
        overlap = float(sib.overlap[i] / fa) if fa else 0.0
        kind = _kind(len(kids), overlap, clean_overlap)
        parents.append(
            {
                "latent": i,
                "fires": fa,
                "kind": kind,
                "children": children,
                "coverage": float(sib.covered[i] / fa) if fa else 0.0,
                "overlap": overlap,
                "leak": float(1 - sib.covered[i] / sib.any_child[i]) if sib.any_child[i] else 0.0,
                "sibling_cofire": float(sib.two_children[i] / sib.any_child[i]) if sib.any_child[i] else 0.0,
            }
        )
    kinds = [p["kind"] for p in parents]
    return {
        "summary": {k: kinds.count(k) for k in ("dropped", "persists", "clean split", "blurred split")}
        | {"new": int((parent < 0).sum())},
        "sibling_histogram": sib.histogram.tolist(),
        "new_latents": np.flatnonzero(parent < 0).tolist(),
        "parents": parents,
    }


def build_report(cfg: SplittingConfig, progress: bool = True) -> dict:
    """Stream the store twice through the ladder; write splits.json and the frontier into `cfg.out`."""
    from tqdm import tqdm

    from saepipe.analyze.frontier import point, write_frontier
    from saepipe.analyze.inputs import excluded_tokens, load_saes, resolve_hook
    from saepipe.analyze.reconstruction import ReconstructionStats, encode_stream
    from saepipe.analyze.spliced import wanted_spliced
    from saepipe.analyze.split_absorption import absorption_data, read_recovery
    from saepipe.analyze.split_families import embed, read_families
    from saepipe.analyze.split_pages import SparseTopN, tokenizer_decode, write_split_pages
    from saepipe.analyze.stability import baseline_for, identity, one_way, seed_groups, stability, verdict
    from saepipe.harvest import open_store

    if not cfg.saes:
        raise SaepipeError("give at least one --saes SAE_DIR")
    families = read_families(cfg.families) if cfg.families else None
    recoveries = [read_recovery(p) for p in cfg.recovery]
    store = open_store(cfg.store)
    loaded = sorted(zip(load_saes(cfg.saes, store, cfg.device), cfg.saes), key=lambda pair: pair[0].d_sae)
    saes, paths = [s for s, _ in loaded], [p for _, p in loaded]
    absorbed = absorption_data(cfg.recovery, recoveries, paths, Path(cfg.out))
    hook = resolve_hook(store, saes, cfg.hook)
    # Edges: each ladder SAE to the next wider one, then each same-width seed pair (the baseline).
    ladder, pairs = seed_groups([identity(s) for s in saes])
    edges = [*pairwise(ladder), *pairs]
    n_levels = len(ladder) - 1
    decoders = [s.W_dec.detach().float().cpu().numpy() for s in saes]
    cos = [cosine_matrix(decoders[a], decoders[b]) for a, b in edges]
    # Positions some SAE never trained on (special tokens) are left out for all, so all see the same tokens.
    drop = sorted({t for s in saes for t in excluded_tokens(s.cfg, store)})
    recon = [ReconstructionStats() for _ in saes]
    counts: list[CoFiring | None] = [None] * len(edges)
    tops = [SparseTopN(s.d_sae, cfg.top_contexts) for s in saes] if cfg.pages else []
    total = min(store.n_tokens, cfg.max_tokens or store.n_tokens) * (2 if edges else 1)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="splitting", disable=not progress)
    for batch in encode_stream(saes, store, hook, cfg.batch_tokens, cfg.max_tokens, drop):
        for r, z, xh in zip(recon, batch.latents, batch.recon):
            r.update(batch.x, xh, z.nnz)
        for top, z in zip(tops, batch.latents):
            top.update(z, batch.addr)
        for e, (a, b) in enumerate(edges):
            c = cofiring(batch.latents[a], batch.latents[b])
            counts[e] = c if counts[e] is None else counts[e] + c
        bar.update(len(batch.x))
    links = [link_latents(cos[e], counts[e], cfg.min_cos, cfg.min_coactivation) for e in range(len(edges))]
    sibs: list[SiblingCounts | None] = [None] * len(edges)
    if edges:
        for batch in encode_stream(saes, store, hook, cfg.batch_tokens, cfg.max_tokens, drop):
            for e, (a, b) in enumerate(edges):
                s = sibling_counts(batch.latents[a], batch.latents[b], links[e])
                sibs[e] = s if sibs[e] is None else sibs[e] + s
            bar.update(len(batch.x))
    bar.close()
    spliced = wanted_spliced(
        cfg.loss_recovered,
        store,
        cfg.store,
        paths,
        cfg.eval_contexts,
        cfg.eval_batch_size,
        cfg.device,
        progress,
    )
    points = [
        point(p, s.architecture, s.d_sae, r, k=s.k, **spliced.get(p, {}))
        for s, p, r in zip(saes, paths, recon)
    ]
    trees = [split_tree(cos[e], counts[e], links[e], sibs[e], cfg.clean_overlap) for e in range(len(edges))]
    seed_pairs = []
    for e, (a, b) in enumerate(edges[n_levels:], start=n_levels):
        st = stability(
            decoders[a], decoders[b], counts[e].fires_a, counts[e].fires_b, cfg.stability_threshold
        )
        seed_pairs.append(
            {"a": paths[a], "b": paths[b], **identity(saes[a]), "stability": st.to_dict(),
             "summary": trees[e]["summary"]}
        )  # fmt: skip
    levels = []
    for e, (a, b) in enumerate(edges[:n_levels]):
        narrow = identity(saes[a])
        found = one_way(decoders[a], decoders[b], counts[e].fires_a, cfg.stability_threshold)
        base = baseline_for(narrow, seed_pairs)
        levels.append(
            {"narrow": paths[a], "wide": paths[b], "found_again": found,
             "seed_baseline": None if base is None else {"pair": [base["a"], base["b"]], "d_sae": base["d_sae"],
                                                         "summary": base["summary"], "stability": base["stability"]}}
            | trees[e]
        )  # fmt: skip
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "store": cfg.store,
        "hook": hook,
        "settings": cfg.model_dump(),
        "saes": [
            {"path": p.sae, "architecture": p.architecture, "d_sae": p.d_sae, "l0": p.l0, "fvu": p.fvu}
            | {k: v for k, v in p.extra.items() if k in ("loss_recovered", "kl")}
            for p in points
        ],
        "excluded_tokens": drop,
        "seed_pairs": seed_pairs,
        "verdict": verdict(seed_pairs, cfg.min_agreement),
        "levels": levels,
    }
    (out / "splits.json").write_text(json.dumps(report, indent=1))
    write_frontier(points, out, title=f"{Path(cfg.store).name} / {hook}")
    if cfg.pages:
        fam = embed(cfg.families, out, report, families) if families is not None else None
        write_split_pages(out, report, tops, store, tokenizer_decode(store), fam, absorbed)
    return report


def _share(summary: dict, kind: str) -> float:
    parents = sum(summary[k] for k in ("dropped", "persists", "clean split", "blurred split"))
    return summary[kind] / parents if parents else 0.0


def level_line(lv: dict) -> str:
    """One line per level: each kind's count and share of parents, next to the seed pair's share."""
    base = lv.get("seed_baseline")
    parts = []
    for kind in ("persists", "clean split", "blurred split", "dropped"):
        seeds = f"; seeds {_share(base['summary'], kind):.1%}" if base else ""
        parts.append(f"{lv['summary'][kind]} {kind} ({_share(lv['summary'], kind):.1%}{seeds})")
    f = lv["found_again"]
    seeds = f"; two seeds of width {base['d_sae']}: {base['stability']['a_to_b']:.1%}" if base else ""
    return (
        f"{Path(lv['narrow']).name} -> {Path(lv['wide']).name}: {', '.join(parts)}, {lv['summary']['new']} new; "
        f"{f['agreement']:.1%} of latents found again at |cos| > threshold{seeds}"
    )


def run(cfg: SplittingConfig) -> int:
    report = build_report(cfg)
    for s in report["saes"]:
        lr = f"  loss recovered {s['loss_recovered']:.4f}" if "loss_recovered" in s else ""
        print(
            f"{s['architecture']:>10} d_sae {s['d_sae']:>7}: L0 {s['l0']:8.2f}  FVU {s['fvu']:.4f}{lr}  {s['path']}"
        )
    for pair in report["seed_pairs"]:
        st = pair["stability"]
        weighted = f", {st['weighted']:.1%} weighted by firing" if st["weighted"] is not None else ""
        print(
            f"seed agreement, {Path(pair['a']).name} vs {Path(pair['b']).name}: {st['agreement']:.1%} of latents "
            f"at decoder |cos| > {st['threshold']:g}{weighted} (random directions: {st['baseline']:.1%}); "
            f"median best |cos| {st['median_best_cos']:.2f} (random {st['baseline_median_best_cos']:.2f})"
        )
    for lv in report["levels"]:
        print(level_line(lv))
    print(report["verdict"]["message"])
    pages = ", index.html" if cfg.pages else ""
    print(f"report written to {cfg.out} (splits.json, frontier.json/.csv/.png{pages})")
    return 0
