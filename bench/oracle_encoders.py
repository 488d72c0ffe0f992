"""How separable a synthetic set's features are for a one-layer encoder that already has the true directions.

An SAE can at best learn the true directions; this asks what its encoder could then do. The oracle score of
feature i on a token is d_i . (x - bias) (d_i the true unit direction), the pre-activation of an encoder
whose rows are the truth. It reports:
- the interference: the score's mean and std where the feature is absent, against where it is present;
- a per-feature threshold (JumpReLU's and BatchTopK's inference form), each feature at the threshold that
  maximises its own F1 on the sample: mean F1 over features and false firings per token;
- a per-token top-k at the true L0 (TopK's form): mean F1 over features.
Why: JumpReLU and BatchTopK recover nothing on the CPU-sized SynthSAEBench recipe while TopK recovers a
third; if perfect directions cannot be thresholded apart, the benchmark's size, not the trainer, is the limit.

    python -m bench.oracle_encoders --truth SYNTH_DIR [--contexts 256]

SYNTH_DIR is a `saepipe synth --out` (store and truth). Contexts are read from the start of the store.
"""

from __future__ import annotations

import numpy as np

from bench.common import parser, record
from saepipe.harvest.synthetic import open_truth


def best_threshold_f1(score: np.ndarray, present: np.ndarray) -> tuple[float, int]:
    """The best F1 over all thresholds of one feature's scores, and its false positives there."""
    order = np.argsort(-score, kind="stable")
    hits = present[order]
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    f1 = 2 * tp / (tp + fp + hits.sum())
    best = int(f1.argmax())
    return float(f1[best]), int(fp[best])


def top_k_f1(scores: np.ndarray, present: np.ndarray, k: int) -> np.ndarray:
    """Per-feature F1 of firing each token's k highest scores."""
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    fire = np.zeros_like(present)
    np.put_along_axis(fire, top, True, axis=1)
    tp, fp, fn = (fire & present).sum(0), (fire & ~present).sum(0), (~fire & present).sum(0)
    return 2 * tp / np.maximum(2 * tp + fp + fn, 1)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--truth", required=True, help="a `saepipe synth --out` directory")
    p.add_argument("--contexts", type=int, default=256, help="contexts from the store's start to score")
    args = p.parse_args()
    truth = open_truth(args.truth)
    codes = truth.codes(0, args.contexts)
    directions = truth.directions.astype(np.float64)
    scores = codes @ directions @ directions.T  # (x - bias) @ D^T with x = codes @ D + bias
    present = (codes != 0).toarray()
    n_tokens, d = scores.shape[0], directions.shape[1]
    l0 = present.sum(1).mean()
    seen = present.any(0)
    absent, there = scores[~present], scores[present]
    thresholded = [best_threshold_f1(scores[:, i], present[:, i]) for i in np.flatnonzero(seen)]
    f1_threshold = float(np.mean([f for f, _ in thresholded]))
    false_per_token = sum(fp for _, fp in thresholded) / n_tokens
    f1_topk = float(top_k_f1(scores, present, max(1, round(l0)))[seen].mean())
    print(f"{n_tokens:,} tokens, {truth.n_features} features in d={d}, true L0 {l0:.2f}")
    print(
        f"oracle score: absent mean {absent.mean():.2f} std {absent.std():.2f}; present mean {there.mean():.2f}"
    )
    print(
        f"per-feature best threshold: mean F1 {f1_threshold:.3f}, {false_per_token:.2f} false firings per token"
    )
    print(f"per-token top-{round(l0)}: mean F1 {f1_topk:.3f}")
    record(
        args,
        "oracle encoders",
        f"{truth.n_features} features in d={d}, true L0 {l0:.2f}, {n_tokens:,} tokens",
        f"absent score std {absent.std():.2f} vs present mean {there.mean():.2f}",
        f"threshold F1 {f1_threshold:.3f} ({false_per_token:.2f} false/token), top-{round(l0)} F1 {f1_topk:.3f}",
        "cpu",
    )


if __name__ == "__main__":
    main()
