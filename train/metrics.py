"""What the trainer reports at each log interval, and where: a console line and (optionally) W&B.

Per SAE: the loss terms, MSE, FVU (relative to the batch mean, not to zero), L0, the fraction of latents
dead over the dead-latent window, a histogram of log10 latent densities over the interval; per run:
tokens/s. W&B is imported only when enabled; `offline` writes <out>/wandb and needs no network.
"""

from __future__ import annotations

import math
import secrets
import time
from typing import Any

import numpy as np
import torch

from saepipe.train.saes import SAE, TrainOutput


def fvu(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: squared error over the variance around the batch mean (0-d, on
    the batch's device)."""
    return (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


class IntervalMetrics:
    """Accumulates one SAE's statistics between two log lines (firing counts are global, all ranks).

    Everything stays on the compute device until `summary()`, called only at log steps, so the steps in
    between never wait for the GPU (a `float()` per metric per step would, issue 16).
    """

    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.fire_counts: torch.Tensor | None = None  # [d_sae] int64, on the device of the first step
        self.tokens = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, out: TrainOutput, x: torch.Tensor, global_counts: torch.Tensor, global_tokens: int) -> None:
        counts = global_counts.detach()
        self.fire_counts = counts.clone() if self.fire_counts is None else self.fire_counts + counts
        self.tokens += global_tokens
        self.steps += 1
        values = {f"loss/{k}": v for k, v in out.terms.items()}
        values["loss/total"] = out.loss.detach()
        values["mse"] = (x - out.recon).pow(2).sum(-1).mean()
        values["fvu"] = fvu(x, out.recon)
        values["l0"] = out.fire_counts.sum() / x.shape[0]
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def summary(self, sae: SAE) -> dict[str, Any]:
        """The interval's means; the one place the accumulated values are read back to the host."""
        steps = max(self.steps, 1)
        out: dict[str, Any] = {k: float(v) / steps for k, v in self.sums.items()}
        out["dead_fraction"] = float(sae.dead_mask(sae.dead_window).float().mean())
        counts = (
            self.fire_counts if self.fire_counts is not None else torch.zeros(self.d_sae, dtype=torch.int64)
        )
        density = counts.cpu().double() / max(self.tokens, 1)
        out["log10_density"] = np.log10(density.clamp_min(1e-10).numpy())
        return out


def console_line(step: int, total: int, tokens: int, rate: float, per_sae: dict[str, dict]) -> str:
    parts = [f"step {step:,}/{total:,}", f"{tokens:,} tokens", f"{rate:,.0f} tok/s"]
    for name, m in per_sae.items():
        parts.append(f"{name}: fvu {m['fvu']:.4f} l0 {m['l0']:.1f} dead {m['dead_fraction']:.1%}")
    return " | ".join(parts)


class Reporter:
    """Console lines and W&B (rank 0 only); `wandb_id` is kept in checkpoints to continue the same run."""

    def __init__(
        self, mode: str, project: str, out: str, name: str, config: dict, wandb_id: str | None, enabled: bool
    ):
        self.run = None
        self.wandb_id = wandb_id
        self.enabled = enabled
        self.last_time, self.last_tokens = time.perf_counter(), 0
        if enabled and mode != "disabled":
            import wandb

            self.wandb = wandb
            self.wandb_id = wandb_id or secrets.token_hex(6)
            self.run = wandb.init(
                project=project,
                name=name,
                dir=out,
                mode=mode,
                id=self.wandb_id,
                resume="allow",
                config=config,
            )

    def log(
        self, step: int, total: int, tokens: int, per_sae: dict[str, dict], extra: dict | None = None
    ) -> None:
        """`extra`: W&B-only values already named (train/monitor.py: learning rate, coefficients)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        print(console_line(step, total, tokens, rate, per_sae), flush=True)
        if self.run is not None:
            flat: dict[str, Any] = {"tokens": tokens, "tokens_per_second": rate}
            for name, m in per_sae.items():
                for k, v in m.items():
                    if k == "log10_density":
                        finite = v[np.isfinite(v)]
                        flat[f"{name}/log10_density"] = self.wandb.Histogram(
                            finite if len(finite) else [math.nan]
                        )
                    else:
                        flat[f"{name}/{k}"] = v
            self.run.log({**flat, **(extra or {})}, step=step)

    def log_extra(self, step: int, values: dict[str, Any]) -> None:
        """Log already-named values to W&B at `step` (train/monitor.py's evaluations)."""
        if self.enabled and self.run is not None:
            self.run.log(values, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
