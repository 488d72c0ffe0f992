"""The train stage: stream activation stores into sparse autoencoders (`saepipe train`).

`load_sae(dir)` loads a trained SAE dir (see saepipe.train.sae_dir) as a torch module. It is imported
lazily so that `saepipe --help` does not pay for torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_sae", "save_sae"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from saepipe.train import sae_dir

        return getattr(sae_dir, name)
    raise AttributeError(f"module 'saepipe.train' has no attribute {name!r}")
