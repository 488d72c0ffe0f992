"""Top activating contexts per latent: the window around each kept position, the simple running top-k that
keeps them (the reference for saepipe.analyze.stats_fast.SlottedTopK), and the ContextSet the report and
the explanations read (the `k` kept entries as arrays, by key or by value).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WINDOW_BEFORE = 15
WINDOW_AFTER = 4
WINDOW = WINDOW_BEFORE + 1 + WINDOW_AFTER


@dataclass
class ContextSet:
    """`n` ranked token positions per latent with their windows. Empty slots: context -1, value NaN."""

    values: np.ndarray  # [n_latents, n] float32
    contexts: np.ndarray  # [n_latents, n] int64
    positions: np.ndarray  # [n_latents, n] int64
    window_tokens: np.ndarray  # [n_latents, n, WINDOW] int32, -1 outside the context
    window_acts: np.ndarray  # [n_latents, n, WINDOW] float32, NaN where the latent has no value


class RunningTopK:
    """Per latent, the `k` entries with the largest keys seen so far, with values, addresses and windows.

    The simple reference: each merge sorts all kept entries with the candidates and rebuilds every field.
    `saepipe.analyze.stats_fast.SlottedTopK` is the fast path with identical results.
    """

    def __init__(self, n_latents: int, k: int, device: torch.device):
        self.k = k
        f = {"device": device}
        self.keys = torch.full((k, n_latents), -torch.inf, **f)  # [k, L]
        self.values = torch.full((k, n_latents), torch.nan, **f)
        self.contexts = torch.full((k, n_latents), -1, dtype=torch.long, **f)
        self.positions = torch.full((k, n_latents), -1, dtype=torch.long, **f)
        self.win_tokens = torch.full((k, n_latents, WINDOW), -1, dtype=torch.int32, **f)
        self.win_acts = torch.full((k, n_latents, WINDOW), torch.nan, **f)

    @property
    def threshold(self) -> torch.Tensor:
        """[L] the k-th largest key so far (-inf until k entries are kept): only larger keys can enter."""
        return self.keys[-1]

    def update(
        self,
        rows: torch.Tensor,
        lats: torch.Tensor,
        keys: torch.Tensor,
        z_CPL: torch.Tensor,
        tokens_CT: torch.Tensor,
        ctx0: int,
    ) -> None:
        """Merge candidate entries (row of z_CPL flattened, latent, key) of a group of contexts.

        z_CPL: [contexts, positions, latents] latent activations of positions `first..T-1` where
        first = T - positions; tokens_CT: [contexts, T] int32. Candidates should be prefiltered with
        `threshold` (a sparse merge of the few that can enter is far cheaper than a dense top-k over
        every row and latent; at 16k latents it is the difference between seconds and milliseconds).
        """
        if len(rows) == 0:
            return
        k, L = self.keys.shape
        dev = self.keys.device
        # All entries of the merge: the k kept per latent (flat index s * L + l) and the candidates.
        lat_all = torch.cat([torch.arange(L, device=dev).repeat(k), lats])
        key_all = torch.cat([self.keys.flatten(), keys])
        src_all = torch.arange(len(lat_all), device=dev)
        order = key_all.argsort(descending=True, stable=True)
        order = order[lat_all[order].argsort(stable=True)]  # by latent, then key descending
        lat_s = lat_all[order]
        counts = torch.bincount(lat_s, minlength=L)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(len(order), device=dev) - starts[lat_s]
        keep = rank < k  # every latent has its k old slots, so exactly k are kept per latent
        slot, lat, src = rank[keep], lat_s[keep], src_all[order][keep]

        old = src < k * L
        o_slot, o_lat, o_flat = slot[old], lat[old], src[old]
        new_keys = torch.empty_like(self.keys)
        new_keys[slot, lat] = key_all[src]
        fields = {
            "values": (self.values, torch.nan),
            "contexts": (self.contexts, -1),
            "positions": (self.positions, -1),
            "win_tokens": (self.win_tokens, -1),
            "win_acts": (self.win_acts, torch.nan),
        }
        for name, (t, empty) in fields.items():
            fresh = torch.full_like(t, empty)
            fresh[o_slot, o_lat] = t.flatten(0, 1)[o_flat]
            setattr(self, name, fresh)
        self.keys = new_keys

        slot, lat = slot[~old], lat[~old]
        row = rows[src[~old] - k * L]
        P = z_CPL.shape[1]
        T = tokens_CT.shape[1]
        first = T - P
        c, p = row // P, first + row % P
        self.values[slot, lat] = z_CPL[c, p - first, lat]
        self.contexts[slot, lat] = ctx0 + c
        self.positions[slot, lat] = p
        offsets = torch.arange(-WINDOW_BEFORE, WINDOW_AFTER + 1, device=dev)
        wp = p[:, None] + offsets  # [m, WINDOW] positions in the context
        in_ctx = (wp >= 0) & (wp < T)
        has_act = (wp >= first) & in_ctx
        c2 = c[:, None].expand_as(wp)
        self.win_tokens[slot, lat] = torch.where(in_ctx, tokens_CT[c2, wp.clamp(0, T - 1)], -1)
        acts = z_CPL[c2, (wp - first).clamp(0, P - 1), lat[:, None].expand_as(wp)]
        self.win_acts[slot, lat] = torch.where(has_act, acts, torch.nan)

    def ranked(self) -> dict[str, torch.Tensor]:
        """Every field as [k, L(, W)], key descending (ties: the entry seen first)."""
        names = ("values", "contexts", "positions", "win_tokens", "win_acts")
        return {name: getattr(self, name) for name in names}


def _context_set(ranked: dict[str, torch.Tensor], order: torch.Tensor | None = None) -> ContextSet:
    """A running top-k's fields [k, L(, W)] as a ContextSet [L, k(, W)]; each latent's entries in `order`
    [L, k] (indices into its k slots), or in key order when None."""

    def take(t: torch.Tensor) -> np.ndarray:
        t = t.transpose(0, 1).cpu()
        if order is None:
            return t.numpy()
        return t.gather(1, order if t.dim() == 2 else order[..., None].expand(-1, -1, t.shape[2])).numpy()

    return ContextSet(
        take(ranked["values"]).astype(np.float32, copy=False),
        take(ranked["contexts"]),
        take(ranked["positions"]),
        take(ranked["win_tokens"]),
        take(ranked["win_acts"]).astype(np.float32, copy=False),
    )


def keyed_context_set(ranked: dict[str, torch.Tensor], n: int | None = None) -> ContextSet:
    """The first `n` entries of a running top-k in key order (for a reservoir: a random order)."""
    return _context_set({name: t[:n] for name, t in ranked.items()})


def ranked_context_set(ranked: dict[str, torch.Tensor], ascending: bool = False) -> ContextSet:
    """A running top-k's entries ordered by value (largest first unless `ascending`), empty slots last.

    `ranked` is `RunningTopK.ranked()` (or the fast path's): fields [k, L(, W)] in key order; the sort is
    stable, so equal values stay in key order.
    """
    v = ranked["values"].T.cpu()  # [L, k]
    key = torch.where(torch.isnan(v), torch.inf if ascending else -torch.inf, v)
    return _context_set(ranked, key.argsort(dim=1, descending=not ascending, stable=True))
