"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

f(x) = pre * H(pre - theta) with a learned per-latent threshold theta and an L0 penalty. H has no useful
gradient, so both functions get straight-through pseudo-derivatives w.r.t. theta using a rectangle kernel
of width `bandwidth`: only pairs with pre within bandwidth/2 of theta send theta a gradient, which is why
the training support is pre > theta - bandwidth/2. Unit-norm decoder.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from saepipe.train.saes.base import SAE, SparseCode, StepContext


def _window(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return ((x - threshold).abs() < bandwidth / 2).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_threshold = -(threshold / bw) * _window(x, threshold, bw) * g
        return (x > threshold) * g, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        return torch.zeros_like(x), -(1.0 / bw) * _window(x, threshold, bw) * g, None


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    has_threshold = True
    default_hparams: ClassVar[dict[str, Any]] = {
        "l0_coefficient": 1.0,
        "bandwidth": 0.001,
        "threshold_init": 0.001,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold = nn.Parameter(torch.full((self.d_sae,), float(self.hparams["threshold_init"])))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """Pairs above the threshold (and above 0, as encode's non-zero values are), from pre directly."""
        pre = self.pre_acts(x)
        rows, latents = torch.nonzero((pre > self.threshold) & (pre > 0), as_tuple=True)
        return SparseCode(rows, latents, pre[rows, latents], x.shape[0])

    def support(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lowest = self.threshold.detach() - self.hparams["bandwidth"] / 2
        rows, latents = (pre > lowest).nonzero(as_tuple=True)
        return rows, latents

    def activation(self, pre_values: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(pre_values, self.threshold[latents], self.hparams["bandwidth"])

    def extra_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        theta = self.threshold[ctx.code.latents]
        l0 = _Step.apply(ctx.pre_values, theta, self.hparams["bandwidth"]).sum() / ctx.code.n_tokens
        return {"l0": self.hparams["l0_coefficient"] * ctx.sparsity_scale * l0}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=1e-6)  # a threshold at or below zero would make the latent a ReLU
