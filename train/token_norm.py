"""Per-token input normalisation: every activation scaled to norm sqrt(d_in) before encoding, the scale
undone after decoding (SAELens's `normalize_activations: "constant_norm_rescale"`; issue 19).

Why: on a real residual stream a few positions have norms several times the median, and an SAE trained
on raw activations spends its MSE on them. Scaling each token to one norm makes every position count the
same and makes the encoder compare directions, not magnitudes. Unlike the dataset-wide `--normalize`
factor, a per-token scale depends on the input, so it cannot be folded into the weights: the SAE dir
records it in cfg.json and `load_sae` returns an SAE whose `encode`/`decode` apply it.

As in SAELens, `encode(x)` remembers each token's factor and the next `decode` divides by it (and forgets
it), so `decode(encode(x))` and `forward(x)` are in raw units; a `decode` with no `encode` before it, or
of another batch's shape, is refused rather than returned in the wrong units.
"""

from __future__ import annotations

import numpy as np
import torch

CFG_VALUE = "constant_norm_rescale"
"""cfg.json's `normalize_activations` for an SAE dir trained on per-token normalised inputs."""


def token_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of x [n, d] (float32) scaled to norm sqrt(d); an all-zero row stays zero."""
    from saepipe.harvest.norms import row_norms

    norms = row_norms(x)
    factor = np.float32(np.sqrt(x.shape[-1])) / np.maximum(norms, np.float32(1e-12))
    return (x * factor[:, None]).astype(np.float32, copy=False)


def token_factor(x: torch.Tensor) -> torch.Tensor:
    """[..., 1] factor sqrt(d) / ||x|| of each token, computed in float64 so unscaling is exact."""
    x64 = x.double()
    return x.shape[-1] ** 0.5 / x64.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class TokenNormSAE:
    """Mixin placed in front of an architecture's class by `with_token_norm`."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        factor = token_factor(x)
        self._token_factor = factor
        return super().encode((x.double() * factor).to(x.dtype))  # type: ignore[misc]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        factor = self.__dict__.pop("_token_factor", None)
        if factor is None or factor.shape[:-1] != z.shape[:-1]:
            raise RuntimeError(
                "this SAE normalises each token (constant_norm_rescale): decode needs the norms of the "
                "activations it reconstructs; call encode on them first (or forward)"
            )
        out = super().decode(z)  # type: ignore[misc]
        return (out.double() / factor).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


_CLASSES: dict[type, type] = {}


def with_token_norm(sae: torch.nn.Module) -> torch.nn.Module:
    """`sae` itself, its class swapped for one that normalises per token (weights untouched)."""
    base = type(sae)
    if issubclass(base, TokenNormSAE):
        return sae
    if base not in _CLASSES:
        _CLASSES[base] = type(f"TokenNorm{base.__name__}", (TokenNormSAE, base), {})
    sae.__class__ = _CLASSES[base]
    return sae
