"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

f(x) = pre * H(pre - theta) with a learned per-latent threshold theta and an L0 penalty. theta is
log-parameterised (as in Gemma Scope), so Adam moves it by a relative step and it never crosses zero. H has no useful
gradient, so both functions get straight-through pseudo-derivatives w.r.t. theta using a rectangle kernel
of width `bandwidth`: only pairs with pre within bandwidth/2 of theta send theta a gradient, which is why
the training support is pre > theta - bandwidth/2. Unit-norm decoder.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from saepipe.train.saes.base import StepContext, ThresholdSAE


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


class JumpReLUSAE(ThresholdSAE):
    architecture = "jumprelu"
    default_hparams: ClassVar[dict[str, Any]] = {
        "l0_coefficient": 1.0,
        "bandwidth": 0.001,
        "threshold_init": 0.001,
        "target_l0": None,
    }
    scaled_hparams: ClassVar[tuple[str, ...]] = ("bandwidth", "threshold_init")
    """Settings given in units of the input's RMS per dimension; the trainer converts them to input units."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        start = math.log(float(self.hparams["threshold_init"]))
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), start))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def set_tensor(self, name: str, value: torch.Tensor) -> None:
        if name == "threshold":
            self.log_threshold.copy_(value.log())
        else:
            super().set_tensor(name, value)

    def support(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lowest = self.threshold.detach() - self.hparams["bandwidth"] / 2
        rows, latents = (pre > lowest).nonzero(as_tuple=True)
        return rows, latents

    def activation(self, pre_values: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(pre_values, self.threshold[latents], self.hparams["bandwidth"])

    def extra_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        theta = self.threshold[ctx.code.latents]
        l0 = _Step.apply(ctx.pre_values, theta, self.hparams["bandwidth"]).sum() / ctx.code.n_tokens
        target = self.hparams.get("target_l0")
        penalty = (l0 / target - 1) ** 2 if target else l0
        return {"l0": self.hparams["l0_coefficient"] * ctx.sparsity_scale * penalty}
