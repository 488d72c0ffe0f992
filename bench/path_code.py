"""Why no SAE recovers SynthSAEBench's hierarchy at the true L0: one direction per root-to-leaf path is
nearly as good a code, at a fraction of the L0.

On the SynthSAEBench recipe a child is scaled by its parent's value and most inner nodes never fire without
a child, so the vector a tree adds to a token (its active root-to-leaf path) is, up to small noise in the
magnitude ratios, a fixed direction times the root's value. This measures, on a synthetic set's truth:
- the L0 the hierarchy takes per token in the true code, and in a path code (one latent per active tree);
- how often an inner node fires without any child (so that its own direction shows alone), by depth;
- the variance a path code cannot explain: per path (grouped by its deepest active node), what the best
  single direction (the top singular vector of the path's vectors) leaves, as a fraction of the data's
  variance, i.e. the FVU a perfect path code pays for that L0;
- with `--sae DIR ...`: how many of the paths each SAE has a decoder row for (|cos| >= 0.9 to the path's
  direction), against how many of the hierarchy's own features it recovers.

    python -m bench.path_code --truth SYNTH_DIR [--contexts 512] [--sae SAE_DIR ...]

SYNTH_DIR is a `saepipe synth --out` of the synthsaebench recipe; contexts are read from the store's start.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from bench.common import parser, record
from saepipe.analyze.recovery import cosine_matrix
from saepipe.harvest.synthetic import open_truth
from saepipe.train.sae_dir import load_sae

MIN_CHAINS = 20
"""Paths seen fewer times are left out of the per-SAE count (their direction is too noisy to score)."""


def depth_and_root(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each feature's depth in its tree (0 for roots and features outside the hierarchy) and its root."""
    root, depth = np.arange(len(parent)), np.zeros(len(parent), dtype=np.int64)
    while (up := parent[root] >= 0).any():
        root[up], depth[up] = parent[root[up]], depth[up] + 1
    return depth, root


def tree_vectors(codes: sp.csr_matrix, directions: np.ndarray, parent: np.ndarray):
    """One row per (token, active tree): the tree's summed vector from each depth down ([depths, rows, d]:
    the whole path, the path below the root, ...), and its deepest active node; and which features are in
    a tree (those with a parent or a child; the others are left out)."""
    depth, root = depth_and_root(parent)
    in_tree = (parent >= 0) | np.isin(np.arange(len(parent)), parent)
    coo = codes.tocoo()
    keep = in_tree[coo.col]
    rows, cols, vals = coo.row[keep], coo.col[keep], coo.data[keep].astype(np.float64)
    key = rows.astype(np.int64) * len(parent) + root[cols]
    uniq, group = np.unique(key, return_inverse=True)
    vectors = np.stack(
        [
            sp.csr_matrix((vals * (depth[cols] >= top), (group, cols)), shape=(len(uniq), len(parent)))
            @ directions
            for top in range(int(depth.max()) + 1)
        ]
    )
    order = np.lexsort((depth[cols], group))  # by group, and within a group the deepest last
    last = np.flatnonzero(np.append(np.diff(group[order]) != 0, len(order) > 0))
    return vectors, cols[order][last], in_tree


def top_direction(vectors: np.ndarray) -> np.ndarray:
    """The unit direction that best fits the rows (their top singular vector), signed along their mean;
    zero for rows that are all zero."""
    if not vectors.any():
        return np.zeros(vectors.shape[1])
    top = np.linalg.svd(vectors, full_matrices=False)[2][0]
    return top if vectors.mean(0) @ top >= 0 else -top


def path_directions(vectors: np.ndarray, deepest: np.ndarray) -> tuple[np.ndarray, float]:
    """Each path's best single direction from each depth down ([depths, paths seen >= MIN_CHAINS times, d])
    and the summed squared residual of all whole paths around theirs."""
    order = np.argsort(deepest, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(deepest[order])) + 1)
    best, residual = [], 0.0
    for idx in groups:
        _, s, _ = np.linalg.svd(vectors[0, idx], full_matrices=False)
        residual += float((s[1:] ** 2).sum())
        if len(idx) >= MIN_CHAINS:  # a path that ends above some depth has no direction from there down
            best.append([top_direction(v[idx]) for v in vectors])
    return np.array(best).reshape(len(best), *vectors.shape[::2]).transpose(1, 0, 2), residual


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--truth", required=True, help="a `saepipe synth --out` directory (synthsaebench recipe)")
    p.add_argument("--contexts", type=int, default=512, help="contexts from the store's start to measure")
    p.add_argument(
        "--sae", nargs="*", default=[], help="SAE dirs trained on that store, to count their paths"
    )
    args = p.parse_args()
    truth = open_truth(args.truth)
    codes = truth.codes(0, args.contexts).tocsr()
    directions = truth.directions.astype(np.float64)
    x = codes @ directions
    variance = float(((x - x.mean(0)) ** 2).sum())
    vectors, deepest, in_tree = tree_vectors(codes, directions, truth.parent)
    if not vectors.shape[1]:
        raise SystemExit(f"{args.truth}: no hierarchy; use a `--recipe synthsaebench` set")
    paths, residual = path_directions(vectors, deepest)  # paths seen with only a root are kept too
    n_tokens = codes.shape[0]
    n_tree = int(in_tree.sum())
    tree_l0 = float((codes[:, np.flatnonzero(in_tree)] != 0).sum() / n_tokens)
    path_l0 = vectors.shape[1] / n_tokens
    fvu = residual / variance
    print(
        f"{n_tokens:,} tokens, {truth.n_features} features ({n_tree} in trees), true L0 {codes.nnz / n_tokens:.2f}"
    )
    print(f"the trees' L0 per token: {tree_l0:.2f} in the true code, {path_l0:.2f} with one latent per path")
    print(f"{len(np.unique(deepest))} paths seen; one direction per path leaves {fvu:.4f} of the variance")
    depth, _ = depth_and_root(truth.parent)
    inner = np.isin(np.arange(len(depth)), truth.parent)
    alone = [
        np.isin(deepest, np.flatnonzero(inner & (depth == d))).sum()
        / max((codes[:, np.flatnonzero(inner & (depth == d))] != 0).sum(), 1)
        for d in range(int(depth[inner].max()) + 1)
    ]
    print(
        "inner nodes firing without a child, by depth: "
        + ", ".join(f"{d} {a:.2%}" for d, a in enumerate(alone))
    )
    figures = f"trees' L0 {tree_l0:.2f} true vs {path_l0:.2f} path code; path code FVU {fvu:.4f}"
    tree_dirs = directions[in_tree]
    for path in args.sae:
        decoder = load_sae(path).W_dec.detach().double().numpy()
        features = float((cosine_matrix(tree_dirs, decoder).max(1) >= 0.9).mean())
        found = [float((cosine_matrix(v[v.any(1)], decoder).max(1) >= 0.9).mean()) for v in paths]
        below = ", ".join(f"from depth {d} {f:.3f}" for d, f in enumerate(found))
        print(f"{path}: tree features recovered {features:.3f}; paths (seen >= {MIN_CHAINS} times) {below}")
        figures += f"; {path.rstrip('/').split('/')[-1]}: features {features:.3f}, paths {below}"
    record(
        args,
        "path code",
        f"{truth.n_features} features, {n_tree} in trees, {n_tokens:,} tokens",
        figures,
        f"L0 {tree_l0 / path_l0:.1f}x lower for {fvu:.4f} FVU",
        "cpu",
    )


if __name__ == "__main__":
    main()
