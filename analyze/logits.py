"""Logit effects: which tokens a latent's decoder direction promotes and suppresses (no forward pass).

This is the direct path only: the decoder row `d` [d_model] is read as if added to the final residual
stream and taken through the final norm and the unembedding. The final norm is folded in as follows:

    u = d - mean(d)        only for LayerNorm (its centering is linear; RMSNorm does not center)
    u = u * gamma          the norm's elementwise scale (1 + w for Gemma-style norms that store w)
    effect = u @ W_U       [d_vocab]

The norm's division by the residual's scale is left out: it depends on the whole residual stream, not on
the latent, and multiplies every token's effect by the same positive number, so it changes no ranking. The
unembedding bias is left out too (the same for every latent). Effects are therefore comparable across the
tokens of one latent, and across latents only up to that scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Unembedding:
    W_U: torch.Tensor  # [d_model, d_vocab]
    gamma: torch.Tensor | None  # [d_model] final-norm scale, None when the norm has none
    center: bool
    """The final norm is a LayerNorm (subtracts the mean)."""


@dataclass
class LogitEffects:
    top_ids: np.ndarray  # [n_latents, n] int64, most promoted first
    top_values: np.ndarray  # [n_latents, n] float32
    bottom_ids: np.ndarray  # [n_latents, n] int64, most suppressed first
    bottom_values: np.ndarray  # [n_latents, n] float32 (negative for a suppressed token)


def unembedding_of(bridge: Any) -> Unembedding:
    """W_U and the final norm of a TransformerBridge."""
    W_U = bridge.W_U.detach().float()
    ln = getattr(bridge, "ln_final", None)
    original = getattr(ln, "original_component", None) if ln is not None else None
    weight = getattr(original, "weight", None)
    gamma = None
    if isinstance(weight, torch.Tensor):
        gamma = weight.detach().float()
        if type(original).__name__.startswith("Gemma"):  # Gemma's RMSNorm computes x * (1 + w)
            gamma = 1.0 + gamma
    center = str(getattr(bridge.cfg, "normalization_type", "")).startswith("LN")
    return Unembedding(W_U, gamma, center)


@torch.inference_mode()
def logit_effects(W_dec: torch.Tensor, unembed: Unembedding, n: int, batch: int = 1024) -> LogitEffects:
    """Top `n` promoted and suppressed tokens of every decoder row of `W_dec` [n_latents, d_model]."""
    W_U = unembed.W_U
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for s in range(0, len(W_dec), batch):
        u = W_dec[s : s + batch].to(W_U.device).float()
        if unembed.center:
            u = u - u.mean(dim=1, keepdim=True)
        if unembed.gamma is not None:
            u = u * unembed.gamma
        effect = u @ W_U  # [b, d_vocab]
        top = effect.topk(n, dim=1)
        bottom = (-effect).topk(n, dim=1)
        for lst, t in zip(parts, (top.indices, top.values, bottom.indices, -bottom.values)):
            lst.append(t.cpu().numpy())
    top_ids, top_values, bottom_ids, bottom_values = (np.concatenate(p) for p in parts)
    return LogitEffects(
        top_ids.astype(np.int64),
        top_values.astype(np.float32),
        bottom_ids.astype(np.int64),
        bottom_values.astype(np.float32),
    )
