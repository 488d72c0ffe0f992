"""Harvest stage: run a language model with hooks over text and write activations to a Zarr v3 store.

The store format is documented in `saepipe.harvest.store` and harvest/README.md; later stages read
stores only through `open_store`.
"""

from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.store import ActivationStore, HookStats, open_store

__all__ = ["ActivationStore", "HarvestConfig", "HookStats", "open_store"]
