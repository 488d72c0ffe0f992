"""SAE architectures, one module each, found by name in `ARCHITECTURES`.

Every module in this package is imported here and each `SAE` subclass that names an `architecture`
registers itself (`SAE.__init_subclass__`), so a sixth architecture is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from saepipe.train.saes.base import ARCHITECTURES, SAE, SparseCode, TrainOutput

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_sae(
    architecture: str, d_in: int, d_sae: int, k: int | None = None, hparams: dict[str, Any] | None = None
) -> SAE:
    """A freshly initialised SAE of a registered architecture."""
    if architecture not in ARCHITECTURES:
        raise KeyError(
            f"unknown SAE architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[architecture](d_in, d_sae, k=k, hparams=hparams)


__all__ = ["ARCHITECTURES", "SAE", "SparseCode", "TrainOutput", "build_sae"]
