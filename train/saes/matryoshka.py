"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

The dictionary's leading latents must reconstruct on their own: the reconstruction loss is the mean over
nested prefixes (default d_sae/8, /4, /2, all) of the error using only latents below the prefix size, so
early latents learn general features and later ones refine them. Selection, threshold and AuxK as in
BatchTopK.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saepipe.train.saes.base import SparseCode, mse
from saepipe.train.saes.batchtopk import BatchTopKSAE


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    default_hparams: ClassVar[dict[str, Any]] = {**BatchTopKSAE.default_hparams, "prefixes": None}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        prefixes = self.hparams["prefixes"] or [max(1, self.d_sae // 2**i) for i in (3, 2, 1, 0)]
        prefixes = sorted(set(int(p) for p in prefixes))
        if prefixes[0] < 1 or prefixes[-1] != self.d_sae:
            raise ValueError(
                f"matryoshka prefixes must be positive and end at d_sae={self.d_sae}: {prefixes}"
            )
        self.hparams["prefixes"] = prefixes

    def reconstruction_losses(self, x: torch.Tensor, code: SparseCode) -> tuple[torch.Tensor, dict]:
        losses = []
        for size in self.hparams["prefixes"]:
            recon = self.decode_code(code.select(code.latents < size))
            losses.append(mse(x, recon))
        return recon, {"mse": torch.stack(losses).mean()}
