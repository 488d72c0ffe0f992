"""What a training run's W&B shows besides the interval metrics (train/metrics.py), under the names SAELens's
trainer uses, so a SAELens user reads the dashboard without a glossary:

    details/current_learning_rate                          every log line: the learning rate of the step
    <sae>/details/l1_coefficient, <sae>/details/l0_coefficient
                                                           every log line: relu's L1 / jumprelu's L0
                                                           weight including its warm-up (and
                                                           jumprelu's L0 controller)
    <sae>/model_performance_preservation/ce_loss_score     every --eval-every steps and at the end:
        ... /ce_loss_with_sae, ce_loss_without_sae,          loss recovered and KL of the SAE spliced into
            ce_loss_with_ablation                           the store's model on --eval-contexts held-out
    <sae>/model_behavior_preservation/kl_div_with_sae        contexts (train/faithfulness.py, the same
        ... /kl_div_with_ablation, kl_div_score              measurement as `saepipe evaluate`)

The evaluation runs on rank 0 only, on the SAE as its dir will hold it (input normalisation folded in,
per-token normalisation around it), with the BOS position (and with --drop-special the special tokens'
positions) kept as `saepipe evaluate` keeps them; at the last step it reports what
`saepipe evaluate --contexts <eval-contexts>` reports for the saved SAE. The held-out contexts are those
packed after the store's when training starts; under `--follow` the growing store may take them in later.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from saepipe.errors import SaepipeError
from saepipe.harvest.corpus import heldout_contexts
from saepipe.harvest.models import load_store_model
from saepipe.train.config import TrainConfig
from saepipe.train.faithfulness import measure
from saepipe.train.sae_dir import folded
from saepipe.train.saes import SAE
from saepipe.train.splice import Splice
from saepipe.train.token_norm import with_token_norm

SPARSITY_COEFFICIENTS = {"l1_coefficient": "l1", "l0_coefficient": "l0"}
"""Architecture settings the sparsity warm-up scales -> SAELens's coefficient name."""

EVAL_BATCH = 8
"""Contexts per forward of an evaluation."""


def details(lr: float, sparsity_scale: float, saes: dict[str, SAE]) -> dict[str, float]:
    """The learning rate and each SAE's effective sparsity coefficient at this step."""
    out = {"details/current_learning_rate": float(lr)}
    for name, sae in saes.items():
        for key, short in SPARSITY_COEFFICIENTS.items():
            if key in sae.hparams:
                weight = float(sae.hparams[key]) * sparsity_scale * sae.coefficient_multiplier
                out[f"{name}/details/{short}_coefficient"] = weight
    return out


class Monitor:
    """Spliced faithfulness every `cfg.eval_every` steps; does nothing when that is off or off rank 0."""

    def __init__(self, cfg: TrainConfig, store: Any, device: torch.device, is_main: bool):
        self.every = cfg.eval_every if is_main else None
        self.hook = cfg.hook
        if not self.every:
            return
        if store.info.is_synthetic:
            raise SaepipeError(
                f"--eval-every: store {store.path} holds synthetic activations, with no model to splice into; "
                "train without --eval-every"
            )
        model = load_store_model(store, str(device), "train without --eval-every", prefix="--eval-every: ")
        self.bridge = model.bridge
        self.tokens: np.ndarray = heldout_contexts(store, model.tokenizer, cfg.eval_contexts)
        self.skip_bos = store.info.prepend_bos
        # positions the SAEs never trained on stay unspliced, as `saepipe evaluate` leaves them (issue 19)
        self.skip_tokens = (
            sorted({*store.special_token_ids, *cfg.special_token_ids}) if cfg.drop_special else []
        )
        self.token_norm = cfg.token_norm

    def due(self, step: int, total: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == total)

    def evaluate(self, step: int, saes: dict[str, SAE], input_scale: float) -> dict[str, float]:
        """Evaluate every SAE at once (one clean and one zero-ablated forward per batch); prints a line."""
        copies = [folded(sae, input_scale) for sae in saes.values()]
        if self.token_norm:  # as load_sae returns the saved SAE: per-token scaling around it
            copies = [with_token_norm(c) for c in copies]
        splices = [Splice(c, hook=self.hook) for c in copies]
        results = measure(
            self.bridge, splices, self.tokens, EVAL_BATCH, self.skip_bos, skip_tokens=self.skip_tokens
        )
        flat: dict[str, float] = {}
        parts = []
        for name, f in zip(saes, results):
            flat.update({f"{name}/{key}": value for key, value in f.saelens_metrics().items()})
            parts.append(f"{name}: loss recovered {f.loss_recovered:.4f} KL {f.kl:.4f}")
        print(
            f"eval at step {step:,} on {len(self.tokens)} held-out contexts | " + " | ".join(parts),
            flush=True,
        )
        return flat
