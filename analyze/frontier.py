"""The sparsity-reconstruction frontier: L0 against FVU for a list of SAEs on one store (issue 5).

Why: at any width an SAE trades sparsity for reconstruction; comparing architectures or widths means
comparing whole (L0, FVU) points, not one of the two. `saepipe.analyze.reconstruction` accumulates both
exactly over streamed batches; `write_frontier` writes the table as JSON and CSV and the plot as PNG
(matplotlib, Agg backend: no display needed).

FVU = sum_t ||x_t - xhat_t||^2 / sum_t ||x_t - mean(x)||^2 over the same tokens; L0 = mean number of
nonzero latents per token.

On a store from a real model, reconstruction is still a proxy: what matters is how much of the model's
next-token loss survives when the SAE replaces the activations. `saepipe.analyze.spliced` gets each SAE's
fraction of loss recovered (and KL) from `saepipe evaluate` itself (saepipe.analyze.evaluate, held-out text packed
like the store's), so the frontier's numbers are exactly the ones `saepipe evaluate` prints; the table gains
their columns and the PNG a second panel, L0 against loss recovered.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from saepipe.analyze.reconstruction import ReconstructionStats


@dataclass(frozen=True)
class FrontierPoint:
    """One SAE on the frontier."""

    sae: str
    """The SAE dir."""
    architecture: str
    d_sae: int
    l0: float
    fvu: float
    n_tokens: int
    extra: dict = field(default_factory=dict)
    """Anything else measured (e.g. k, loss recovered), flattened into the table."""


def point(sae: str, architecture: str, d_sae: int, stats: ReconstructionStats, **extra) -> FrontierPoint:
    return FrontierPoint(sae, architecture, int(d_sae), stats.l0, stats.fvu, stats.n_tokens, dict(extra))


def as_row(p: FrontierPoint) -> dict:
    """One flat table row (extra fields inlined), as in frontier.json."""
    row = asdict(p)
    row.update(row.pop("extra"))
    return row


def write_frontier(points: list[FrontierPoint], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """frontier.json, frontier.csv and frontier.png in `out_dir`; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [as_row(p) for p in points]
    paths = {"json": out / "frontier.json", "csv": out / "frontier.csv", "png": out / "frontier.png"}
    paths["json"].write_text(json.dumps(rows, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    plot_frontier(points, paths["png"], title)
    return paths


PANELS = {"fvu": "FVU (fraction of variance unexplained)", "loss_recovered": "fraction of loss recovered"}
"""Plot panels by the value on their y axis; loss_recovered appears only when some point has it."""


def plot_frontier(points: list[FrontierPoint], path: str | Path, title: str = "") -> list[str]:
    """L0 (log x) against FVU and, when measured, against loss recovered: one line per architecture through
    its widths, each point labelled by width. Returns the panels drawn (keys of PANELS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def y(p: FrontierPoint, key: str) -> float | None:
        v = p.fvu if key == "fvu" else p.extra.get(key)
        return None if v is None or not np.isfinite(v) else float(v)

    panels = [k for k in PANELS if any(y(p, k) is not None for p in points)] or ["fvu"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), dpi=120, squeeze=False)
    for ax, key in zip(axes[0], panels):
        for arch in sorted({p.architecture for p in points}):
            pts = sorted(
                (p for p in points if p.architecture == arch and y(p, key) is not None), key=lambda p: p.l0
            )
            ax.plot([p.l0 for p in pts], [y(p, key) for p in pts], "o-", label=arch)
            for p in pts:
                ax.annotate(
                    f"{p.d_sae}", (p.l0, y(p, key)), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        if points and min(p.l0 for p in points) > 0:
            ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(PANELS[key])
        ax.grid(alpha=0.3)
        ax.legend(title="architecture", fontsize=8, loc="upper right" if key == "fvu" else "lower right")
    fig.suptitle(title or "sparsity-reconstruction frontier")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return panels


def measure_frontier(
    sae_paths: list[str],
    store_path: str,
    hook: str | None = None,
    batch_tokens: int = 4096,
    max_tokens: int | None = None,
    device: str = "cpu",
) -> list[FrontierPoint]:
    """L0 and FVU of each SAE over the store's tokens (one pass, every SAE per batch), in the order given.

    For callers that need the frontier without split trees, e.g. the L0 and FVU columns of the recovery
    table (`saepipe.analyze.recovery_table.frontier_metrics`) on a synthetic set."""
    from saepipe.analyze.inputs import load_saes, resolve_hook
    from saepipe.analyze.reconstruction import ReconstructionStats, encode_stream
    from saepipe.harvest import open_store

    store = open_store(store_path)
    saes = load_saes(sae_paths, store, device)
    hook = resolve_hook(store, saes, hook)
    stats = [ReconstructionStats() for _ in saes]
    for batch in encode_stream(saes, store, hook, batch_tokens, max_tokens):
        for r, z, x_hat in zip(stats, batch.latents, batch.recon):
            r.update(batch.x, x_hat, z.nnz)
    return [point(p, s.architecture, s.d_sae, r, k=s.k) for s, p, r in zip(saes, sae_paths, stats)]
