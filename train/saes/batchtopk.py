"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the n * k largest ReLU pre-activations over the whole batch of n tokens, so k is the
average L0 and tokens may use more or fewer latents. Inference cannot depend on the batch, so a single
threshold is estimated during training: an exponential moving average of the smallest positive kept
activation per batch; a loaded SAE encodes pre * (pre > threshold). AuxK as in TopK. Unit-norm decoder.
While the trainer's `token_warmup` flag is set (`--token-selection-warmup`), each token keeps its own k
largest instead, as TopK does: from random weights batch selection collapses on SynthSAEBench, but started
from TopK's directions it keeps them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saepipe.train.saes.base import StepContext, ThresholdSAE
from saepipe.train.saes.sparse import dense_mode
from saepipe.train.saes.topk import auxk_loss, token_topk_support


def batch_topk_support(
    acts: torch.Tensor, k: int, per_row: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, latents) of the n * k largest entries of `acts` [n, d_sae], sorted by (row, latent).

    Fast path: each row's `per_row` (default 4k) largest entries are candidates and the global top n * k is
    taken among them; that is exact unless some row had every candidate chosen (it might hold more), in
    which case the whole matrix is ranked. `batch_topk_reference` is the plain version (tests compare)."""
    n, d_sae = acts.shape
    m = min(d_sae, per_row or 4 * k)
    if m == d_sae or dense_mode():
        return batch_topk_reference(acts, k)
    values, idx = acts.topk(m, dim=-1, sorted=False)
    chosen = values.reshape(-1).topk(n * k, sorted=False).indices
    rows = chosen // m
    if int(torch.bincount(rows, minlength=n).max()) >= m:
        return batch_topk_reference(acts, k)
    flat = (rows * d_sae + idx.reshape(-1)[chosen]).sort().values
    return flat // d_sae, flat % d_sae


def batch_topk_reference(acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, d_sae = acts.shape
    flat = acts.reshape(-1).topk(n * k, sorted=False).indices.sort().values
    return flat // d_sae, flat % d_sae


class BatchTopKSAE(ThresholdSAE):
    architecture = "batchtopk"
    uses_k = True
    default_hparams: ClassVar[dict[str, Any]] = {
        "auxk_coefficient": 1 / 32,
        "auxk_k": None,
        "threshold_decay": 0.99,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.zeros(self.d_sae))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def support(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.token_warmup:  # --token-selection-warmup: TopK's selection first
            return token_topk_support(pre, self.active_k)
        return batch_topk_support(torch.relu(pre), self.active_k)

    def extra_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"auxk": auxk_loss(self, ctx)}

    def batch_stats(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        values = ctx.code.values.detach()
        positive = values[values > 0]
        smallest = positive.min() if positive.numel() else values.new_zeros(())
        return {"threshold": smallest}

    @torch.no_grad()
    def update_state(self, stats: dict[str, torch.Tensor]) -> None:
        value = stats["threshold"].to(self.threshold.dtype)
        if int(self.threshold_updates) == 0:
            self.threshold.fill_(float(value))
        else:
            decay = self.hparams["threshold_decay"]
            self.threshold.mul_(decay).add_((1 - decay) * value)
        self.threshold_updates += 1
