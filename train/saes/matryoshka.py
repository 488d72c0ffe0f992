"""Matryoshka SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

The dictionary's leading latents must reconstruct on their own: the reconstruction loss is the mean over
nested prefixes (default d_sae/8, /4, /2, all) of the error using only latents below the prefix size, so
early latents learn general features and later ones refine them. AuxK as in TopK.

`selection` picks the latents: "batch" (the published recipe, default) keeps the n * k largest over the
batch with BatchTopK's inference threshold; "token" keeps each token's k largest and encodes as TopK at
inference too (no threshold; SAELens loads it as "topk"). On the SynthSAEBench recipe batch selection
collapses onto a few hundred latents from random weights, in SAELens's BatchTopK as in ours, and token
selection does not; `--token-selection-warmup` (token selection first) rescues batch selection in part
(bench/RESULTS.md, "Recovery vs budget" and "JumpReLU's L0 controller ...").
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from saepipe.train.saes.base import SparseCode, StepContext, mse
from saepipe.train.saes.batchtopk import BatchTopKSAE
from saepipe.train.saes.topk import TopKSAE

SELECTIONS = ("batch", "token")


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    default_hparams: ClassVar[dict[str, Any]] = {
        **BatchTopKSAE.default_hparams,
        "prefixes": None,
        "selection": "batch",
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        prefixes = self.hparams["prefixes"] or [max(1, self.d_sae // 2**i) for i in (3, 2, 1, 0)]
        prefixes = sorted(set(int(p) for p in prefixes))
        if prefixes[0] < 1 or prefixes[-1] != self.d_sae:
            raise ValueError(
                f"matryoshka prefixes must be positive and end at d_sae={self.d_sae}: {prefixes}"
            )
        self.hparams["prefixes"] = prefixes
        if self.hparams["selection"] not in SELECTIONS:
            raise ValueError(
                f"matryoshka selection must be one of {SELECTIONS}: {self.hparams['selection']!r}"
            )
        if self.per_token:  # TopK at inference: no threshold to estimate, save or load
            self.has_threshold = False
            del self.threshold, self.threshold_updates

    @property
    def per_token(self) -> bool:
        return self.hparams["selection"] == "token"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return TopKSAE.encode(self, x) if self.per_token else super().encode(x)

    def encode_sparse(self, x: torch.Tensor) -> SparseCode:
        return TopKSAE.encode_sparse(self, x) if self.per_token else super().encode_sparse(x)

    def support(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return TopKSAE.support(self, pre) if self.per_token else super().support(pre)

    def batch_stats(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {} if self.per_token else super().batch_stats(ctx)

    def update_state(self, stats: dict[str, torch.Tensor]) -> None:
        if not self.per_token:
            super().update_state(stats)

    def reconstruction_losses(self, x: torch.Tensor, code: SparseCode) -> tuple[torch.Tensor, dict]:
        losses = []
        for size in self.hparams["prefixes"]:
            recon = self.decode_code(code.select(code.latents < size))
            losses.append(mse(x, recon))
        return recon, {"mse": torch.stack(losses).mean()}
