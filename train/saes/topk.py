"""TopK SAE with the AuxK loss for dead latents (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders").

Each token keeps its k largest ReLU pre-activations. AuxK reconstructs the main model's residual error
with the top `auxk_k` latents among those that have been dead for the trainer's window, so latents that
stopped firing get a gradient and come back. As in Gao et al., the AuxK error is normalised by the
residual's variance and weighted 1/32 relative to a reconstruction loss normalised by the input's
variance; our reconstruction loss is the plain MSE, so the term is scaled by the batch's input variance
(without it AuxK is ~1e-4 of the loss and dead latents take thousands of steps to return). Decoder rows
are unit norm.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saepipe.train.saes.base import SAE, SparseCode, StepContext, global_variances, mse


class TopKSAE(SAE):
    architecture = "topk"
    uses_k = True
    default_hparams: ClassVar[dict[str, Any]] = {"auxk_coefficient": 1 / 32, "auxk_k": None}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.pre_acts(x))
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """The k selected pairs per token straight from top-k, latents ascending, zeros dropped.

        Top-k of pre then ReLU of the k values keeps the same positive pairs as encode's top-k of
        ReLU(pre) (only zeros could differ, and they are dropped) without a ReLU pass over every latent.
        """
        values, indices = self.pre_acts(x).topk(self.k, dim=-1)
        indices, order = indices.sort(dim=-1)
        values = torch.relu(values.gather(-1, order))
        keep = values > 0
        rows = torch.arange(len(x), device=x.device)[:, None].expand_as(indices)
        return SparseCode(rows[keep], indices[keep], values[keep], x.shape[0])

    def support(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_topk_support(pre, self.active_k)

    def extra_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"auxk": auxk_loss(self, ctx)}


def token_topk_support(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, latents) of each token's k largest pre-activations (TopK's selection)."""
    return rows_of(pre.topk(k, dim=-1, sorted=False).indices)


def rows_of(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token latent indices [n, m] to flat (rows, latents) [n * m]."""
    n, m = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(m)
    return rows, indices.reshape(-1)


def auxk_loss(sae: SAE, ctx: StepContext) -> torch.Tensor:
    """Gao et al.'s AuxK term (already weighted); zero when no latent is dead."""
    coefficient = sae.hparams["auxk_coefficient"]
    dead = sae.dead_mask(sae.dead_window)
    n_dead = int(dead.sum())
    if n_dead == 0 or coefficient == 0:
        return ctx.x.new_zeros(())
    k_aux = min(sae.hparams["auxk_k"] or max(1, sae.d_in // 2), n_dead)
    indices = ctx.pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False).indices
    rows, latents = rows_of(indices)
    code, _ = sae.code_at(ctx.x_c, ctx.pre, rows, latents)
    error = (ctx.x - ctx.recon).detach()
    error_hat = sae.decode_code(code, with_bias=False)
    x_variance, variance = global_variances(ctx.x.detach(), error)
    return coefficient * mse(error, error_hat) * x_variance / variance.clamp_min(1e-12)
