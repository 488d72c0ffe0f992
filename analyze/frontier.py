"""The sparsity-reconstruction frontier: L0 against FVU for a list of SAEs on one store (issue 5).

Why: at any width an SAE trades sparsity for reconstruction; comparing architectures or widths means
comparing whole (L0, FVU) points, not one of the two. `ReconstructionStats` accumulates both exactly over
streamed batches (float64 sums, so chunking does not change the result); `write_frontier` writes the table
as JSON and CSV and the plot as PNG (matplotlib, Agg backend: no display needed).

FVU = sum_t ||x_t - xhat_t||^2 / sum_t ||x_t - mean(x)||^2 over the same tokens; L0 = mean number of
nonzero latents per token.

On a store from a real model, reconstruction is still a proxy: what matters is how much of the model's
next-token loss survives when the SAE replaces the activations. `spliced_metrics` gets each SAE's fraction
of loss recovered (and KL) from `saepipe evaluate` itself (saepipe.analyze.evaluate, held-out text packed
like the store's), so the frontier's numbers are exactly the ones `saepipe evaluate` prints; the table gains
their columns and the PNG a second panel, L0 against loss recovered.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from saepipe.errors import SaepipeError


@dataclass
class ReconstructionStats:
    """Running sums over tokens of one SAE; `update` per batch, then read `fvu` and `l0`."""

    n_tokens: int = 0
    sum_x: np.ndarray | None = None  # [d] float64
    sum_sq_x: float = 0.0
    sum_sq_err: float = 0.0
    sum_active: int = 0

    def update(self, x: np.ndarray, x_hat: np.ndarray, n_active: int) -> None:
        """x, x_hat: [N, d]; n_active: nonzero latents summed over the N tokens."""
        x64 = x.astype(np.float64)
        s = x64.sum(axis=0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq_x += float((x64 * x64).sum())
        self.sum_sq_err += float(((x64 - x_hat.astype(np.float64)) ** 2).sum())
        self.sum_active += int(n_active)
        self.n_tokens += x.shape[0]

    @property
    def l0(self) -> float:
        return self.sum_active / max(self.n_tokens, 1)

    @property
    def fvu(self) -> float:
        if self.n_tokens == 0 or self.sum_x is None:
            return float("nan")
        mean = self.sum_x / self.n_tokens
        total = self.sum_sq_x - self.n_tokens * float(mean @ mean)
        return self.sum_sq_err / total if total > 0 else float("nan")


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


def is_model_store(store: Any) -> bool:
    """True for a store harvested from a language model (synthetic and hand-made stores have no layers), the
    only kind where splicing an SAE back into a model means anything."""
    return not store.info.is_synthetic


SPLICED_KEYS = ("loss_recovered", "kl", "ce_clean", "ce_spliced", "ce_zero")
"""What the frontier takes from each `saepipe evaluate` result."""


def spliced_metrics(
    sae_paths: list[str], store: str, contexts: int, batch_size: int, device: str, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Per SAE dir, `saepipe evaluate`'s loss recovered, KL and losses on `contexts` held-out contexts."""
    from saepipe.analyze.config import EvaluateConfig
    from saepipe.analyze.evaluate import evaluate

    out = {}
    for path in sae_paths:
        cfg = EvaluateConfig(sae=path, store=store, contexts=contexts, batch_size=batch_size, device=device)
        res = evaluate(cfg, progress=progress)
        out[path] = {k: float(getattr(res, k)) for k in SPLICED_KEYS}
    return out


def resolve_hook(store: Any, sae_cfgs: list[dict], hook: str | None) -> str:
    """The hook to read: the one given, else the SAEs' common `hook_name`, else the store's only hook."""
    if hook is None:
        names = {c.get("hook_name") for c in sae_cfgs}
        if len(names) == 1 and next(iter(names)) in store.hooks:
            hook = next(iter(names))
        elif len(store.hooks) == 1:
            hook = store.hooks[0]
        else:
            raise SaepipeError(
                f"cannot tell which hook of {store.path} the SAEs read ({sorted(map(str, names))}); give --hook"
            )
    if hook not in store.hooks:
        raise SaepipeError(f"store {store.path} has no hook {hook!r}; it holds: {', '.join(store.hooks)}")
    return hook


def check_compatible(path: str, cfg: dict, store: Any) -> None:
    """Refuse an SAE whose input width or training model differs from the store's."""
    from saepipe.train.sae_dir import SAERecord

    SAERecord.of(cfg).compatible_with(store, path)


@dataclass
class EncodedBatch:
    """One batch of store rows encoded by every SAE."""

    addr: np.ndarray  # [N, 2] int64 (context, position)
    x: np.ndarray  # [N, d] float32
    latents: list[sp.csr_matrix]  # per SAE [N, d_sae] float32 (sparse: a wide ladder stays small)
    recon: list[np.ndarray]  # per SAE [N, d] float32


def encode_stream(
    saes: list,
    store: Any,
    hook: str,
    batch_tokens: int,
    max_tokens: int | None = None,
    drop_tokens: Iterable[int] = (),
) -> Iterator[EncodedBatch]:
    """The store's rows in order (BOS and positions holding `drop_tokens` left out), `batch_tokens` at a
    time, encoded and decoded by each SAE."""
    import torch

    done = 0
    with torch.no_grad():
        for acts, addr in store.iter_token_rows(hook, drop_tokens=drop_tokens):
            for b in range(0, len(acts), batch_tokens):
                take = batch_tokens if max_tokens is None else min(batch_tokens, max_tokens - done)
                if take <= 0:
                    return
                x = np.ascontiguousarray(acts[b : b + take], dtype=np.float32)
                latents, recon = [], []
                for sae in saes:
                    xt = torch.from_numpy(x).to(sae.W_dec.device)
                    z = sae.encode(xt)
                    recon.append(sae.decode(z).float().cpu().numpy())
                    latents.append(sp.csr_matrix(z.float().cpu().numpy()))
                yield EncodedBatch(addr[b : b + take], x, latents, recon)
                done += len(x)


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
    from saepipe.harvest import open_store
    from saepipe.train import load_sae

    store = open_store(store_path)
    saes = [load_sae(p, device=device) for p in sae_paths]
    for sae, path in zip(saes, sae_paths):
        check_compatible(path, sae.cfg, store)
    hook = resolve_hook(store, [s.cfg for s in saes], hook)
    stats = [ReconstructionStats() for _ in saes]
    for batch in encode_stream(saes, store, hook, batch_tokens, max_tokens):
        for r, z, x_hat in zip(stats, batch.latents, batch.recon):
            r.update(batch.x, x_hat, z.nnz)
    return [point(p, s.architecture, s.d_sae, r, k=s.k) for s, p, r in zip(saes, sae_paths, stats)]
