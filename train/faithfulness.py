"""How much of a model's behaviour survives an SAE spliced in: the one measurement behind `saepipe evaluate`
and training's `--eval-every`, through saepipe.splice.

For token contexts [n, T], three forwards per batch: clean, each SAE spliced (x -> decode(encode(x))) and
the hook zero-ablated. A leading BOS keeps its activation in all of them (`skip_bos`) and predictions are
scored from the first spliced position on (the BOS position's own prediction is the same in every run):

    ce_*            mean next-token cross-entropy, nats
    kl, kl_zero     mean KL(p_clean || p_spliced), KL(p_clean || p_zero), nats
    loss_recovered  (ce_zero - ce_spliced) / (ce_zero - ce_clean)     SAELens's ce_loss_score
    kl_score        (kl_zero - kl) / kl_zero                           SAELens's kl_div_score
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from saepipe.train.splice import Splice, spliced, zero_ablated


@dataclass(frozen=True)
class Faithfulness:
    n_contexts: int
    n_predictions: int
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    kl: float
    kl_zero: float

    @property
    def loss_recovered(self) -> float:
        denom = self.ce_zero - self.ce_clean
        return (self.ce_zero - self.ce_spliced) / denom if denom != 0 else float("nan")

    @property
    def kl_score(self) -> float:
        return (self.kl_zero - self.kl) / self.kl_zero if self.kl_zero != 0 else float("nan")

    def saelens_metrics(self) -> dict[str, float]:
        """These numbers under the W&B names SAELens's trainer logs its evals with."""
        perf, behav = "model_performance_preservation", "model_behavior_preservation"
        return {
            f"{perf}/ce_loss_score": self.loss_recovered,
            f"{perf}/ce_loss_with_sae": self.ce_spliced,
            f"{perf}/ce_loss_without_sae": self.ce_clean,
            f"{perf}/ce_loss_with_ablation": self.ce_zero,
            f"{behav}/kl_div_score": self.kl_score,
            f"{behav}/kl_div_with_sae": self.kl,
            f"{behav}/kl_div_with_ablation": self.kl_zero,
        }


@torch.inference_mode()
def measure(
    bridge: Any,
    splices: Sequence[Splice],
    tokens: np.ndarray,
    batch_size: int,
    skip_bos: bool,
    on_batch: Callable[[int], None] | None = None,
) -> list[Faithfulness]:
    """One Faithfulness per splice (all at one hook, which is zero-ablated) over `tokens` [n, T]."""
    hooks = {s.hook for s in splices}
    if len(hooks) != 1:
        raise ValueError(f"measure takes splices at one hook, got {sorted(hooks)}")
    (hook,) = hooks
    device = next(bridge.parameters()).device
    first = 1 if skip_bos else 0
    ce = np.zeros(len(splices) + 2)  # clean, zero, then each splice (float64 sums)
    kl = np.zeros(len(splices) + 1)  # zero, then each splice
    n_pred = 0
    for b in range(0, len(tokens), batch_size):
        batch = torch.as_tensor(tokens[b : b + batch_size], dtype=torch.long, device=device)
        target = batch[:, first + 1 :].reshape(-1)

        def log_probs(logits: torch.Tensor) -> torch.Tensor:
            return F.log_softmax(logits[:, first:-1].float(), dim=-1).flatten(0, 1)

        clean = log_probs(bridge(batch, return_type="logits"))
        ce[0] += float(F.nll_loss(clean, target, reduction="sum"))
        with zero_ablated(bridge, hook, skip_bos=skip_bos):
            other = log_probs(bridge(batch, return_type="logits"))
        ce[1] += float(F.nll_loss(other, target, reduction="sum"))
        kl[0] += float(F.kl_div(other, clean, log_target=True, reduction="sum"))
        for i, s in enumerate(splices):
            del other
            with spliced(bridge, s, skip_bos=skip_bos):
                other = log_probs(bridge(batch, return_type="logits"))
            ce[i + 2] += float(F.nll_loss(other, target, reduction="sum"))
            kl[i + 1] += float(F.kl_div(other, clean, log_target=True, reduction="sum"))
        n_pred += len(target)
        if on_batch is not None:
            on_batch(len(batch))
    ce, kl = ce / n_pred, kl / n_pred
    return [
        Faithfulness(
            len(tokens), n_pred, float(ce[0]), float(ce[i + 2]), float(ce[1]), float(kl[i + 1]), float(kl[0])
        )
        for i in range(len(splices))
    ]
