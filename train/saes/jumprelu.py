"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

f(x) = pre * H(pre - theta) with a learned per-latent threshold theta and an L0 penalty. theta is
log-parameterised (as in Gemma Scope), so Adam moves it by a relative step and it never crosses zero. H has no useful
gradient, so both functions get straight-through pseudo-derivatives w.r.t. theta using a rectangle kernel
of width `bandwidth`: only pairs with pre within bandwidth/2 of theta send theta a gradient, which is why
the training support is pre > theta - bandwidth/2. Unit-norm decoder.

With `target_l0` the penalty is l0_coefficient * m * L0, and m is steered to the target by an integral
controller (SynthSAEBench's recipe for JumpReLU, our own implementation): each step log m moves towards
less or more sparsity by at most `autotune_rate`, scaled by tanh(10 |relative error|) of an EMA of the
batch L0, and by 1/100 while the L0 already heads for the target fast enough to arrive within 100 batches
(so it neither overshoots nor stalls on a slow approach).
Why: a fixed weight gives whatever L0 the data and width make of it (32 for a target of 11 at weight 1 on
SynthSAEBench), and a quadratic pull towards the target settles where its slope balances the
reconstruction's, not at the target; the controller makes the target L0 the L0.

While the trainer's `token_warmup` flag is set (`--token-selection-warmup`), each token keeps its
k = round(target_l0) largest ReLU pre-activations (TopK's rule), with no L0 penalty, and every threshold
waits at an EMA of the batch's (n*k)-th largest pre-activation (the one cut that gives L0 k). Why: from
random weights JumpReLU finds no SynthSAEBench feature, but started from TopK's directions it keeps them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from saepipe.train.saes.base import StepContext, ThresholdSAE
from saepipe.train.saes.topk import token_topk_support

LOG_MULTIPLIER_RANGE = math.log(100.0)
"""The controller keeps m within [1/100, 100] of `l0_coefficient`."""
EMA, TREND = 0.99, 0.95
"""Smoothing of the batch L0 (a ~100-batch window) and of its per-batch change."""
HORIZON, ARRIVING_GAIN = 100, 0.01
"""While the L0 heads for the target fast enough to reach it within HORIZON batches, the controller
moves at ARRIVING_GAIN of its rate (so it does not overshoot); heading there slower, at the full rate."""


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
        "autotune_rate": 1e-3,
    }
    scaled_hparams: ClassVar[tuple[str, ...]] = ("bandwidth", "threshold_init")
    """Settings given in units of the input's RMS per dimension; the trainer converts them to input units."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        start = math.log(float(self.hparams["threshold_init"]))
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), start))
        # The L0 controller's state (checkpointed, not in the SAE dir): EMA of the batch L0, its trend,
        # log of the penalty's multiplier m, and how many batches it has seen.
        for name in ("l0_ema", "l0_trend", "log_multiplier"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64))
        self.register_buffer("l0_batches", torch.zeros((), dtype=torch.int64))
        # The warm-up's EMA of the batch cut that gives L0 k (0: no warm-up batch seen yet).
        self.register_buffer("warmup_cut", torch.zeros((), dtype=torch.float64))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def set_tensor(self, name: str, value: torch.Tensor) -> None:
        if name == "threshold":
            self.log_threshold.copy_(value.log())
        else:
            super().set_tensor(name, value)

    @property
    def warmup_k(self) -> int:
        return max(1, round(self.hparams["target_l0"]))

    def support(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.token_warmup:
            return token_topk_support(pre, self.warmup_k)
        lowest = self.threshold.detach() - self.hparams["bandwidth"] / 2
        rows, latents = (pre > lowest).nonzero(as_tuple=True)
        return rows, latents

    def activation(self, pre_values: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if self.token_warmup:
            return torch.relu(pre_values)
        return _JumpReLU.apply(pre_values, self.threshold[latents], self.hparams["bandwidth"])

    @property
    def coefficient_multiplier(self) -> float:
        return float(self.log_multiplier.exp()) if self.hparams.get("target_l0") else 1.0

    def extra_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.token_warmup:
            return {"l0": ctx.x.new_zeros(())}
        theta = self.threshold[ctx.code.latents]
        l0 = _Step.apply(ctx.pre_values, theta, self.hparams["bandwidth"]).sum() / ctx.code.n_tokens
        weight = self.hparams["l0_coefficient"] * ctx.sparsity_scale
        if self.hparams.get("target_l0"):
            weight = weight * self.log_multiplier.exp().float()
        return {"l0": weight * l0}

    def batch_stats(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.token_warmup:
            kept = torch.relu(ctx.pre).reshape(-1).topk(ctx.pre.shape[0] * self.warmup_k, sorted=False).values
            return {"cut": kept.min().double()}
        fired = (ctx.code.values.detach() > 0).sum()
        return {"l0": fired.double() / ctx.code.n_tokens} if self.hparams.get("target_l0") else {}

    @torch.no_grad()
    def update_state(self, stats: dict[str, torch.Tensor]) -> None:
        """One controller step on the (rank-averaged) batch L0, or in the warm-up one step of the thresholds'
        starting cut; tensor ops only, so a GPU never waits."""
        if "cut" in stats:
            cut = stats["cut"].to(self.warmup_cut).clamp_min(1e-6)
            self.warmup_cut.copy_(
                torch.where(self.warmup_cut > 0, EMA * self.warmup_cut + (1 - EMA) * cut, cut)
            )
            self.log_threshold.data.copy_(self.warmup_cut.log().float().expand_as(self.log_threshold))
            return
        if "l0" not in stats:
            return
        l0, first = stats["l0"].to(self.l0_ema), self.l0_batches == 0
        ema = torch.where(first, l0, EMA * self.l0_ema + (1 - EMA) * l0)
        self.l0_trend.copy_(
            torch.where(first, 0.0, TREND * self.l0_trend + (1 - TREND) * (ema - self.l0_ema))
        )
        self.l0_ema.copy_(ema)
        self.l0_batches += 1
        target = self.hparams["target_l0"]
        error = ema / target - 1
        arriving = (error * self.l0_trend < 0) & ((ema - target).abs() < HORIZON * self.l0_trend.abs())
        gain = torch.where(arriving, ARRIVING_GAIN, 1.0).to(error)
        step = self.hparams["autotune_rate"] * gain * torch.tanh(10 * error.abs())
        self.log_multiplier.add_(torch.sign(error) * step).clamp_(-LOG_MULTIPLIER_RANGE, LOG_MULTIPLIER_RANGE)
