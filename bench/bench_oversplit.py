"""Err on the side of splitting, then cut back (issue 13): does merging an over-complete SAE's split families
back to the true width keep the hierarchy and the rare features?

    python -m bench.bench_oversplit --true runs/oversplit/recovery/topk-w2048-k11.json \
        --wide runs/oversplit/recovery/topk-w8192-k11.json \
        --merged runs/oversplit/recovery/topk-w8192-k11-merged-w2048.json

Reads three `saepipe recovery --out` reports of one synthetic set: (a) an SAE trained at the true width,
(b) one trained over-complete, (c) (b) merged back (`saepipe families`); `saepipe run oversplit` writes all
three. Prints recovery by frequency decile (most frequent first), absorption, and the issue's target:
(c) recovers at least half of the features in each of the three most frequent deciles while keeping (b)'s
gain over (a) in the rarest decile. Measured, never assumed: the verdict says by how much it is met or
missed. A scientific result, not a timing: it is written up in RESULTS.md's own section, not appended to
the timing table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def deciles(report: dict) -> list[float]:
    """Fraction recovered per frequency bin, most frequent first."""
    return [float(b["fraction_recovered"]) for b in report["by_frequency"]]


def verdict(a: dict, b: dict, c: dict) -> tuple[bool, str]:
    """(met, sentence) for the issue's target."""
    da, db, dc = deciles(a), deciles(b), deciles(c)
    top = dc[:3]
    gain_b, gain_c = db[-1] - da[-1], dc[-1] - da[-1]
    top_ok = all(v >= 0.5 for v in top)
    rare_ok = gain_c >= gain_b
    met = top_ok and rare_ok
    return met, (
        f"three most frequent deciles of (c): {', '.join(f'{v:.2f}' for v in top)} (target >= 0.50 each: "
        f"{'met' if top_ok else f'missed by up to {0.5 - min(top):.2f}'}); rarest decile: (a) {da[-1]:.2f}, "
        f"(b) {db[-1]:.2f}, (c) {dc[-1]:.2f}, gain over (a) {gain_c:+.2f} against (b)'s {gain_b:+.2f} "
        f"({'kept' if rare_ok else 'not kept'})"
    )


def table(rows: dict[str, dict]) -> str:
    n = len(next(iter(rows.values()))["by_frequency"])
    head = ["SAE", *(f"d{i + 1}" for i in range(n)), "all", "MCC", "absorption"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, r in rows.items():
        cells = [name, *(f"{v:.2f}" for v in deciles(r)), f"{r['fraction_recovered']:.3f}", f"{r['mcc']:.3f}"]
        lines.append("| " + " | ".join([*cells, f"{r['absorption_rate']:.3f}"]) + " |")
    return (
        "\n".join(lines)
        + "\n\nDeciles of true-feature frequency, most frequent (d1) first; cells: fraction of features whose best latent has decoder cosine >= 0.9."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--true", required=True, help="recovery report of (a), trained at the true width")
    p.add_argument("--wide", required=True, help="recovery report of (b), trained over-complete")
    p.add_argument("--merged", required=True, help="recovery report of (c), (b) merged back")
    args = p.parse_args()
    a, b, c = load(args.true), load(args.wide), load(args.merged)
    print(table({"(a) true width": a, "(b) over-complete": b, "(c) (b) merged": c}))
    met, sentence = verdict(a, b, c)
    print(f"\ntarget {'MET' if met else 'MISSED'}: {sentence}")


if __name__ == "__main__":
    main()
