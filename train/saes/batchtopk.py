"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the n * k largest ReLU pre-activations over the whole batch of n tokens, so k is the
average L0 and tokens may use more or fewer latents. Inference cannot depend on the batch, so a single
threshold is estimated during training: an exponential moving average of the smallest positive kept
activation per batch; a loaded SAE encodes pre * (pre > threshold). AuxK as in TopK. Unit-norm decoder.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saepipe.train.saes.base import SAE, SparseCode, StepContext
from saepipe.train.saes.topk import auxk_loss


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    uses_k = True
    has_threshold = True
    default_hparams: ClassVar[dict[str, Any]] = {
        "auxk_coefficient": 1 / 32,
        "auxk_k": None,
        "threshold_decay": 0.99,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.zeros(self.d_sae))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        """Pairs above the threshold (and above 0, as encode's non-zero values are), from pre directly."""
        pre = self.pre_acts(x)
        rows, latents = torch.nonzero((pre > self.threshold) & (pre > 0), as_tuple=True)
        return SparseCode(rows, latents, pre[rows, latents], x.shape[0])

    def support(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, d_sae = pre.shape
        flat = torch.relu(pre).reshape(-1).topk(n * self.k, sorted=False).indices.sort().values
        return flat // d_sae, flat % d_sae

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
