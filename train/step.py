"""One optimizer step of one SAE, with the rank reductions that keep every rank's copy identical.

Each quantity is reduced once per step, here, on the compute device: the gradients (one flat all-reduce),
the firing counts (which the trainer's metrics reuse) and the architecture's batch statistics. The global
token count is not reduced at all: every rank steps on `batch_size` rows, so it is known up front.
Nothing here reads a value back to the host, so a GPU step never waits on a collective's result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saepipe.train import distributed
from saepipe.train.saes import SAE, TrainOutput


@dataclass
class StepResult:
    """What one step gives the trainer's metrics."""

    out: TrainOutput
    """This rank's forward: loss terms, reconstruction and this rank's firing counts."""
    fire_counts: torch.Tensor
    """[d_sae] int64 on the compute device: firing counts of the global batch (summed over ranks)."""
    n_tokens: int
    """Tokens in the global batch."""


def sae_step(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    lr: float,
    sparsity_scale: float = 1.0,
    n_tokens: int | None = None,
) -> StepResult:
    """Loss, backward, gradient mean over ranks, Adam step, decoder-norm constraint, state updates.

    `x` [n, d_in] is this rank's part of the global batch of `n_tokens` rows (default: `n` times the
    number of ranks, which holds because every rank's batch has the same size); latent firing and batch
    statistics are reduced over ranks so dead-latent windows and thresholds agree everywhere.
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
    n_tokens = x.shape[0] * distributed.world_size() if n_tokens is None else n_tokens
    fire_counts = distributed.all_reduce_sum(out.fire_counts)
    sae.record_firing(fire_counts, n_tokens)
    sae.update_state({name: distributed.all_reduce_mean(v) for name, v in out.state_stats.items()})
    return StepResult(out, fire_counts, n_tokens)


def make_optimizer(sae: SAE, lr: float) -> torch.optim.Adam:
    """Adam with the betas of Gao et al. (0.9, 0.999) and a small eps for tiny gradients."""
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
