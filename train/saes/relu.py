"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, "Circuits Updates - April 2024").

Loss: ||x - x_hat||^2 + lambda * sum_i f_i ||W_dec,i||. The decoder is not constrained: weighting the L1
by decoder norms removes the incentive to shrink codes and grow decoder rows. Decoder rows start with
norm 0.1 and the encoder as their transpose, as in the update; lambda warms up linearly (trainer).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saepipe.train.saes.base import SAE, SparseCode, StepContext


class ReLUSAE(SAE):
    architecture = "relu"
    unit_norm_decoder = False
    init_decoder_norm = 0.1
    default_hparams: ClassVar[dict[str, Any]] = {"l1_coefficient": 5.0}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x))

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        pre = self.pre_acts(x)
        rows, latents = torch.nonzero(pre > 0, as_tuple=True)
        return SparseCode(rows, latents, pre[rows, latents], x.shape[0])

    def support(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, latents = (pre > 0).nonzero(as_tuple=True)  # row-major, so rows come sorted
        return rows, latents

    def extra_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        norms = self.W_dec.norm(dim=1)
        l1 = (ctx.code.values * norms[ctx.code.latents]).sum() / ctx.code.n_tokens
        return {"l1": self.hparams["l1_coefficient"] * ctx.sparsity_scale * l1}
