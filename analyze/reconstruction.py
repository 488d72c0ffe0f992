"""Several SAEs streamed over one store in one pass, and the exact reconstruction sums they are judged by.

FVU = sum_t ||x_t - xhat_t||^2 / sum_t ||x_t - mean(x)||^2 over the same tokens; L0 = mean number of
nonzero latents per token. The sums are float64, so how the stream is batched does not change the result.
Used by the frontier, splitting, families and the stability bench.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp


@dataclass
class ReconstructionStats:
    """Running sums over tokens of one SAE; `update` per batch, then read `fvu` and `l0`."""

    n_tokens: int = 0
    sum_x: np.ndarray | None = None  # [d] float64
    sum_sq_x: float = 0.0
    sum_sq_err: float = 0.0
    sum_active: int = 0

    def update(self, x: np.ndarray, x_hat: np.ndarray, n_active: int) -> None:
        """x, x_hat: [N, d]; n_active: nonzero latents summed over the N tokens."""
        x64 = x.astype(np.float64)
        s = x64.sum(axis=0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq_x += float((x64 * x64).sum())
        self.sum_sq_err += float(((x64 - x_hat.astype(np.float64)) ** 2).sum())
        self.sum_active += int(n_active)
        self.n_tokens += x.shape[0]

    @property
    def l0(self) -> float:
        return self.sum_active / max(self.n_tokens, 1)

    @property
    def fvu(self) -> float:
        if self.n_tokens == 0 or self.sum_x is None:
            return float("nan")
        mean = self.sum_x / self.n_tokens
        total = self.sum_sq_x - self.n_tokens * float(mean @ mean)
        return self.sum_sq_err / total if total > 0 else float("nan")


@dataclass
class EncodedBatch:
    """One batch of store rows encoded by every SAE."""

    addr: np.ndarray  # [N, 2] int64 (context, position)
    x: np.ndarray  # [N, d] float32
    latents: list[sp.csr_matrix]  # per SAE [N, d_sae] float32 (sparse: a wide ladder stays small)
    recon: list[np.ndarray]  # per SAE [N, d] float32


def encode_stream(
    saes: list,
    store: Any,
    hook: str,
    batch_tokens: int,
    max_tokens: int | None = None,
    drop_tokens: Iterable[int] = (),
) -> Iterator[EncodedBatch]:
    """The store's rows in order (BOS and positions holding `drop_tokens` left out), `batch_tokens` at a
    time, encoded and decoded by each SAE."""
    import torch

    done = 0
    with torch.no_grad():
        for acts, addr in store.iter_token_rows(hook, drop_tokens=drop_tokens):
            for b in range(0, len(acts), batch_tokens):
                take = batch_tokens if max_tokens is None else min(batch_tokens, max_tokens - done)
                if take <= 0:
                    return
                x = np.ascontiguousarray(acts[b : b + take], dtype=np.float32)
                latents, recon = [], []
                for sae in saes:
                    xt = torch.from_numpy(x).to(sae.W_dec.device)
                    z = sae.encode(xt)
                    recon.append(sae.decode(z).float().cpu().numpy())
                    latents.append(sp.csr_matrix(z.float().cpu().numpy()))
                yield EncodedBatch(addr[b : b + take], x, latents, recon)
                done += len(x)
