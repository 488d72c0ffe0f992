"""One optimizer step of one SAE, with the rank reductions that keep every rank's copy identical."""

from __future__ import annotations

import torch

from saepipe.train import distributed
from saepipe.train.saes import SAE, TrainOutput


def sae_step(
    sae: SAE, optimizer: torch.optim.Optimizer, x: torch.Tensor, lr: float, sparsity_scale: float = 1.0
) -> TrainOutput:
    """Loss, backward, gradient mean over ranks, Adam step, decoder-norm constraint, state updates.

    `x` [n, d_in] is this rank's part of the global batch; latent firing and batch statistics are
    reduced over ranks so dead-latent windows and thresholds agree everywhere.
    """
    out = sae.train_forward(x, sparsity_scale)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    distributed.average_gradients(sae.parameters())
    sae.project_decoder_grad()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    sae.after_optimizer_step()
    n_tokens = int(distributed.all_reduce_sum(torch.tensor([x.shape[0]]))[0])
    sae.record_firing(distributed.all_reduce_sum(out.fire_counts), n_tokens)
    sae.update_state({name: distributed.all_reduce_mean(v) for name, v in out.state_stats.items()})
    return out


def make_optimizer(sae: SAE, lr: float) -> torch.optim.Adam:
    """Adam with the betas of Gao et al. (0.9, 0.999) and a small eps for tiny gradients."""
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
