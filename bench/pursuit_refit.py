"""Pursuit refit (`saepipe refit`) on a synthetic set: how much of the true features does the amortisation
gap of a one-layer encoder hide?

Runs `saepipe refit` on `--sae` (its other flags pass through) and prints, for the SAE and its refit, the
fraction of true features whose best decoder row has |cos| >= 0.9, by the hierarchy's depth (roots, levels
1-3) and for the features outside it, plus the share of root-to-node paths (a node with all its ancestors,
magnitudes at their means) that some decoder row matches at |cos| >= 0.9: the prefix latents absorption
leaves. A third column, `factored`, is the refit with every prefix row whose parent's prefix also has a row
reduced to its part orthogonal to that row, the pairs picked by the truth: the most that factoring prefix
latents into their parts could add with these rows. Score the written dir with `saepipe recovery` for the full table:

    python -m bench.pursuit_refit --sae RUN/topk-w2048-k11 --truth SYNTH_DIR --out RUN/topk-w2048-k11-refit
    saepipe recovery --sae RUN/topk-w2048-k11-refit --truth SYNTH_DIR --max-tokens 262144 --out refit.json
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import parser, record
from saepipe.analyze.recovery import cosine_matrix
from saepipe.harvest.synthetic import open_truth
from saepipe.train import load_sae
from saepipe.train.refit import RefitConfig, run


def depth_of(parent: np.ndarray) -> np.ndarray:
    depth = np.zeros(len(parent), dtype=np.int64)
    for i in np.flatnonzero(parent >= 0):  # parents precede their children
        depth[i] = depth[parent[i]] + 1
    return depth


def prefix_directions(directions: np.ndarray, parent: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """[n, d] unit vectors: each feature's direction plus its ancestors', each at its mean magnitude."""
    out = directions * mean[:, None]
    for i in np.flatnonzero(parent >= 0):  # breadth-first: the parent's row is complete already
        out[i] += out[parent[i]]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def profile(W: np.ndarray, truth, mean: np.ndarray) -> dict[str, float]:
    """Recovered fraction overall, by depth, outside the tree, and of root-to-node paths."""
    parent = truth.parent
    in_tree = (parent >= 0) | np.isin(np.arange(len(parent)), parent)
    depth = depth_of(parent)
    ok = np.abs(cosine_matrix(truth.directions, W)).max(1) >= 0.9
    paths = np.abs(cosine_matrix(prefix_directions(truth.directions, parent, mean), W)).max(1) >= 0.9
    out = {"all": ok.mean(), "outside the tree": ok[~in_tree].mean()}
    for level in range(int(depth.max()) + 1 if in_tree.any() else 0):
        at = in_tree & (depth == level)
        out[f"depth {level}"] = ok[at].mean()
        out[f"paths to depth {level}"] = paths[at].mean()
    return {k: float(v) for k, v in out.items()}


def oracle_factored(W: np.ndarray, truth, mean: np.ndarray) -> np.ndarray:
    """The best a factoring of prefix latents could do with these rows: wherever a node's path and its
    parent's path both have a row (|cos| >= 0.9, two different rows), the node's row keeps only its part
    orthogonal to the parent's row (what is left is the node's own direction). The truth picks the pairs,
    so this is an upper bound for any factoring that has to find them."""
    prefixes = np.abs(cosine_matrix(prefix_directions(truth.directions, truth.parent, mean), W))
    row, found = prefixes.argmax(1), prefixes.max(1) >= 0.9
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    out = unit.copy()
    for node in np.flatnonzero(truth.parent >= 0):
        up = truth.parent[node]
        if found[node] and found[up] and row[node] != row[up]:
            a, b = unit[row[node]], unit[row[up]]
            out[row[node]] = a - (a @ b) * b
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sae", required=True, help="a trained TopK SAE dir")
    p.add_argument("--truth", required=True, help="the `saepipe synth --out` it was trained on")
    p.add_argument("--out", required=True, help="the refit SAE dir to write")
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--encoder-steps", type=int, default=4000)
    p.add_argument("--mean-magnitudes", type=float, nargs=2, default=(5.0, 4.0),
                   help="the recipe's mean magnitudes, most to least frequent (synthsaebench: 5 4)")  # fmt: skip
    args = p.parse_args()
    truth = open_truth(args.truth)
    mean = np.linspace(*args.mean_magnitudes, len(truth.parent))
    t0 = time.perf_counter()
    run(RefitConfig(sae=args.sae, out=args.out, tokens=args.tokens, iterations=args.iterations,
                    encoder_steps=args.encoder_steps, device=args.device))  # fmt: skip
    seconds = time.perf_counter() - t0
    decoders = {
        name: load_sae(d).W_dec.detach().numpy() for name, d in [("sae", args.sae), ("refit", args.out)]
    }
    decoders["factored"] = oracle_factored(decoders["refit"], truth, mean)
    rows = {name: profile(W, truth, mean) for name, W in decoders.items()}
    print(f"{'recovered (|cos| >= 0.9)':<28}" + "".join(f"{n:>10}" for n in rows))
    for key in rows["sae"]:
        print(f"{key:<28}" + "".join(f"{r[key]:>10.3f}" for r in rows.values()))
    print(f"refit: {seconds:.0f} s")
    figures = "; ".join(f"{k} {rows['sae'][k]:.3f} -> {rows['refit'][k]:.3f}" for k in rows["sae"])
    figures += f"; oracle factoring of the refit: all {rows['factored']['all']:.3f}"
    record(args, "pursuit_refit", f"{args.sae}, {args.tokens:,} tokens, {args.iterations} iterations, {seconds:.0f} s",
           figures, f"all x{rows['refit']['all'] / max(rows['sae']['all'], 1e-9):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
