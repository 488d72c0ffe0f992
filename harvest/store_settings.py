"""A typed view of a store's `settings` (documented in `saepipe.harvest.store`), for the questions later
stages ask of a store: which model made it, is there a model at all, where do real tokens start.

The raw dict stays the record (it is what a resume compares and what the cache key hashes); this view only
reads it, so stores keep their bytes. `ActivationStore.info` holds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SYNTHETIC_MODEL = "synthetic"
"""The model name `saepipe synth` records: its stores have no language model behind them."""


@dataclass(frozen=True)
class StoreSettings:
    model_name: str
    model_fingerprint: str | None
    """The model weights' fingerprint (synthetic sets: their features'); SAE dirs record it."""
    d_model: int
    n_layers: int
    """0 for a store with no language model (synthetic, or written by hand)."""
    context_size: int
    prepend_bos: bool
    """Position 0 of every context is BOS (analysis and statistics skip it)."""
    hooks: tuple[str, ...]
    dataset_name: str | None
    vocab_size: int
    n_contexts_target: int

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> StoreSettings:
        model = settings.get("model") or {}
        return cls(
            model_name=str(model.get("name", "")),
            model_fingerprint=model.get("fingerprint"),
            d_model=int(model.get("d_model") or 0),
            n_layers=int(model.get("n_layers") or 0),
            context_size=int(settings.get("context_size") or 0),
            prepend_bos=bool(settings.get("prepend_bos")),
            hooks=tuple(settings.get("hooks") or ()),
            dataset_name=(settings.get("dataset") or {}).get("name"),
            vocab_size=int((settings.get("tokenizer") or {}).get("vocab_size") or 0),
            n_contexts_target=int(settings.get("n_contexts_target") or 0),
        )

    @property
    def is_synthetic(self) -> bool:
        """No language model made these activations (`saepipe synth`, or a store with no layers): nothing
        to load, splice into or take logits from."""
        return self.model_name == SYNTHETIC_MODEL or self.n_layers == 0

    @property
    def first_position(self) -> int:
        """The first position that is real text (1 when position 0 is BOS)."""
        return 1 if self.prepend_bos else 0
