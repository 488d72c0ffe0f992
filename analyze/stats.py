"""Latent statistics in one streaming pass: running top-k contexts, samples, density, mean, max, histogram.

The store is read chunk by chunk (`iter_token_rows`, whole contexts with their addresses) and encoded a
group of contexts at a time; nothing ever holds more than one group's latent activations. Per latent we
keep:

- the `k` largest activations with their address (context, position) and a token window around them
  (`WINDOW_BEFORE` tokens before, `WINDOW_AFTER` after) with the latent's activation on every token of
  the window, captured while the context is in memory so the report never re-encodes the store;
- a uniform sample of `reservoir` active positions (a running top-k over random keys, i.e. reservoir
  sampling vectorized over latents) with their windows: its first `samples` (by key, so themselves a
  uniform sample) are sorted by value for the report, to show what a latent does when weakly active; all
  of them feed the explanations (saepipe.analyze.heldout);
- the whole sparse codes and tokens of a pool of contexts spread over the store (`PoolCodes`), where
  explanations learn how often an n-gram occurs without the latent and are scored on inactive windows;
- counts of active tokens (activation > 0), the activation sum and max, and a histogram of log10
  activation over active tokens on fixed bins (`HIST_EDGES`, 8 per decade; values outside are clipped into
  the end bins), fixed so that one pass suffices without knowing each latent's range in advance.

Window slots outside the context hold token -1; slots with no latent value (outside, or the BOS position,
which the SAE never sees) hold NaN.

Codes arrive sparse (`SAE.encode_sparse`: the active pairs only, so no [tokens, latents] matrix is written
or scanned) or dense. The running top-k and the search for active entries have fast paths in
saepipe.analyze.stats_fast; `SAEPIPE_SIMPLE_STATS=1` switches back to the simple references kept here,
which densify sparse codes (results are identical).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from saepipe.analyze.contexts import (
    WINDOW_AFTER,
    WINDOW_BEFORE,
    ContextSet,
    RunningTopK,
    keyed_context_set,
    ranked_context_set,
)
from saepipe.analyze.stats_fast import (
    DenseCodes,
    SlottedTopK,
    SparseCodes,
    active_entries,
    one_thread,
    simple_stats,
)
from saepipe.train.saes.base import SparseCode

HIST_EDGES = np.linspace(-3.0, 3.0, 49)  # log10(activation) bin edges
"""Edges of the activation histogram in log10 units: 48 bins from 1e-3 to 1e3."""


@dataclass
class LatentStats:
    """Everything one streaming pass learns about each latent."""

    n_tokens: int
    """Tokens encoded (BOS positions excluded, as in training)."""
    n_active: np.ndarray  # [n_latents] int64: tokens with activation > 0
    act_sum: np.ndarray  # [n_latents] float64, over active tokens (activation > 0)
    act_max: np.ndarray  # [n_latents] float32 (0 for a latent never active)
    histogram: np.ndarray  # [n_latents, len(HIST_EDGES) - 1] int64, log10 activation of active tokens
    top: ContextSet
    """Top-k activations, largest first."""
    samples: ContextSet
    """A uniform sample of active positions, smallest value first."""
    reservoir: ContextSet | None = None
    """A larger uniform sample of active positions (`samples` is its first part), in random order: what
    explanations are built from and scored on (saepipe.analyze.heldout)."""
    pool: PoolCodes | None = None
    """Every active (position, latent) of a fixed set of contexts spread over the store."""

    @property
    def density(self) -> np.ndarray:
        return self.n_active / max(self.n_tokens, 1)

    @property
    def mean(self) -> np.ndarray:
        """Mean activation over all tokens (inactive ones count as 0)."""
        return self.act_sum / max(self.n_tokens, 1)


@dataclass
class PoolCodes:
    """The sparse codes of whole contexts (`contexts`, sorted), captured during the pass: for each active
    pair its context, position (in the context, as in ContextSet) and latent, and its value."""

    contexts: np.ndarray  # [n_pool] int64
    tokens: np.ndarray  # [n_pool, context_size] int32, the pool contexts' tokens
    context: np.ndarray  # [nnz] int64
    position: np.ndarray  # [nnz] int64
    latent: np.ndarray  # [nnz] int64
    value: np.ndarray  # [nnz] float32


def spread_contexts(n_contexts: int, n: int) -> np.ndarray:
    """`n` context ids spread evenly over `range(n_contexts)`, as pairs of neighbours (2i, 2i + 1 apart by
    one), so the pool has as many even as odd contexts: the held-out split is by parity."""
    n = min(n, n_contexts) // 2 * 2
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.linspace(0, n_contexts - 2, n // 2).round().astype(np.int64) // 2 * 2
    return np.unique(np.stack([starts, starts + 1], 1).ravel())


class StatsAccumulator:
    """Folds groups of encoded contexts into `LatentStats`.

    A group's codes come dense ([contexts, positions, latents]) or as a `SparseCode` of its rows
    (`SAE.encode_sparse`). `simple` (default: `SAEPIPE_SIMPLE_STATS=1`) uses the simple references
    (`RunningTopK` on a dense code, `nonzero(z > 0)`) instead of the fast paths of
    saepipe.analyze.stats_fast (which never densify a sparse code); the results are identical.
    `reservoir` (>= samples) is the size of the uniform sample kept; `pool` lists contexts whose whole
    sparse codes are kept (see `PoolCodes`).
    """

    def __init__(
        self,
        n_latents: int,
        k: int,
        samples: int,
        device: torch.device,
        seed: int = 0,
        simple: bool | None = None,
        reservoir: int | None = None,
        pool: np.ndarray | None = None,
    ):
        self.simple = simple_stats() if simple is None else simple
        self.n_samples = samples
        r = max(samples, reservoir or samples)
        if self.simple:
            self.top = RunningTopK(n_latents, k, device)
            self.sample = RunningTopK(n_latents, r, device)
        else:
            with one_thread():  # see one_thread: the fast path's bookkeeping runs on one thread
                self.top = SlottedTopK(n_latents, k, device, (WINDOW_BEFORE, WINDOW_AFTER))
                self.sample = SlottedTopK(n_latents, r, device, (WINDOW_BEFORE, WINDOW_AFTER))
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.n_tokens = 0
        f = {"device": device}
        self.n_active = torch.zeros(n_latents, dtype=torch.long, **f)
        self.act_sum = torch.zeros(n_latents, dtype=torch.float64, **f)
        self.act_max = torch.zeros(n_latents, **f)
        self.hist = torch.zeros(n_latents * (len(HIST_EDGES) - 1), dtype=torch.long, **f)
        self.edges = torch.tensor(HIST_EDGES, dtype=torch.float32, **f)
        self.pool = np.zeros(0, dtype=np.int64) if pool is None else np.asarray(pool, dtype=np.int64)
        self.pool_parts: list[tuple[torch.Tensor, ...]] = []
        self.pool_tokens: list[torch.Tensor] = []

    def update(self, z: torch.Tensor | SparseCode, tokens_CT: torch.Tensor, ctx0: int) -> None:
        """Fold in one group: `z` dense [C, P, L] or a SparseCode of its C * P rows; tokens_CT [C, T]."""
        C = tokens_CT.shape[0]
        if isinstance(z, torch.Tensor):
            P, L = z.shape[1], z.shape[2]
            z_NL = z.reshape(C * P, L).float()
        else:
            P, L = z.n_tokens // C, self.act_max.shape[0]
            if self.simple:  # the reference works on the dense code
                z_NL = torch.zeros(C * P, L, device=tokens_CT.device)
                z_NL[z.rows, z.latents] = z.values.float()
        # Everything after finding the active entries works on them only: O(L0 * tokens), not
        # O(latents * tokens).
        if self.simple:
            rows, lat = torch.nonzero(z_NL > 0, as_tuple=True)
            self._update(rows, lat, z_NL[rows, lat], z_NL.view(C, P, L), tokens_CT, ctx0)
        elif isinstance(z, torch.Tensor):
            rows, lat = active_entries(z_NL)
            with one_thread():
                self._update(rows, lat, z_NL[rows, lat], DenseCodes(z_NL, P), tokens_CT, ctx0)
        else:
            with one_thread():
                codes = SparseCodes(z.rows, z.latents, z.values, P, L, z.n_tokens)
                self._update(z.rows, z.latents, codes.values, codes, tokens_CT, ctx0)

    def _update(
        self,
        rows: torch.Tensor,
        lat: torch.Tensor,
        vals: torch.Tensor,
        codes: torch.Tensor | DenseCodes | SparseCodes,
        tokens_CT: torch.Tensor,
        ctx0: int,
    ) -> None:
        """Fold in the active entries (rows, latents, values) of a group; `codes` gives the windows (a dense
        z_CPL for the reference top-k, a code lookup for the fast one)."""
        C, T = tokens_CT.shape
        L = self.act_max.shape[0]
        P = codes.P if not isinstance(codes, torch.Tensor) else codes.shape[1]
        self.n_tokens += C * P
        self.n_active += torch.bincount(lat, minlength=L)
        self.act_sum.index_add_(0, lat, vals.double())
        self.act_max.scatter_reduce_(0, lat, vals, reduce="amax")
        n_bins = len(HIST_EDGES) - 1
        b = torch.bucketize(vals.log10(), self.edges, right=True) - 1
        self.hist.index_add_(0, lat * n_bins + b.clamp(0, n_bins - 1), torch.ones_like(lat))

        enter = vals > self.top.threshold[lat]
        # reservoir sampling: a uniform random key per active entry, keep the k largest keys
        u = torch.rand(len(rows), generator=self.gen, device=vals.device)
        take = u > self.sample.threshold[lat]
        if isinstance(codes, torch.Tensor):
            self.top.update(rows[enter], lat[enter], vals[enter], codes, tokens_CT, ctx0)
            self.sample.update(rows[take], lat[take], u[take], codes, tokens_CT, ctx0)
        else:
            self.top.update(rows[enter], lat[enter], vals[enter], vals[enter], codes, tokens_CT, ctx0)
            self.sample.update(rows[take], lat[take], u[take], vals[take], codes, tokens_CT, ctx0)

        lo, hi = np.searchsorted(self.pool, [ctx0, ctx0 + C])
        if hi > lo:  # this group holds pool contexts: keep their whole codes
            in_pool = torch.zeros(C, dtype=torch.bool, device=vals.device)
            in_pool[torch.from_numpy(self.pool[lo:hi] - ctx0).to(vals.device)] = True
            keep = in_pool[rows // P]
            r = rows[keep]
            self.pool_parts.append((ctx0 + r // P, T - P + r % P, lat[keep], vals[keep]))
            self.pool_tokens.append(tokens_CT[torch.from_numpy(self.pool[lo:hi] - ctx0).to(vals.device)])

    def result(self) -> LatentStats:
        if self.simple:
            return self._result()
        with one_thread():
            return self._result()

    def _result(self) -> LatentStats:
        parts = [torch.cat(x).cpu().numpy() for x in zip(*self.pool_parts)] if self.pool_parts else None
        empty = np.zeros(0, dtype=np.int64)
        seen = len(torch.cat(self.pool_tokens)) if self.pool_tokens else 0
        pool = PoolCodes(
            contexts=self.pool[:seen],  # a run stopped early (max_tokens) saw fewer
            tokens=torch.cat(self.pool_tokens).cpu().numpy().astype(np.int32)
            if self.pool_tokens
            else np.zeros((0, 0), dtype=np.int32),
            context=parts[0] if parts else empty,
            position=parts[1] if parts else empty,
            latent=parts[2] if parts else empty,
            value=parts[3].astype(np.float32) if parts else np.zeros(0, dtype=np.float32),
        )
        sample = self.sample.ranked()
        first = {name: t[: self.n_samples] for name, t in sample.items()}
        return LatentStats(
            n_tokens=self.n_tokens,
            n_active=self.n_active.cpu().numpy(),
            act_sum=self.act_sum.cpu().numpy(),
            act_max=self.act_max.cpu().numpy(),
            histogram=self.hist.view(len(self.act_max), -1).cpu().numpy(),
            top=ranked_context_set(self.top.ranked()),
            samples=ranked_context_set(first, ascending=True),
            reservoir=keyed_context_set(sample),
            pool=pool,
        )


@torch.inference_mode()
def collect_stats(
    store,
    hook: str,
    encode: Callable[[torch.Tensor], torch.Tensor | SparseCode],
    n_latents: int,
    k: int,
    samples: int,
    device: torch.device,
    max_tokens: int | None = None,
    batch_tokens: int = 4096,
    seed: int = 0,
    progress: bool = True,
    simple: bool | None = None,
    reservoir: int | None = None,
    pool_contexts: int = 0,
) -> LatentStats:
    """Stream `store`'s `hook` through `encode` in whole-context groups.

    `encode` maps [n, d_in] to dense codes [n, n_latents] or to a `SparseCode` (`SAE.encode_sparse`,
    what `saepipe analyze` passes unless `SAEPIPE_SIMPLE_STATS=1`). Stops after the context that reaches
    `max_tokens` (so the count is rounded up to whole contexts). `simple`, `reservoir`: see
    `StatsAccumulator`; `pool_contexts`: how many contexts, spread over the analyzed ones, keep their
    whole codes (`LatentStats.pool`).
    """
    first = store.info.first_position
    P = store.context_size - first
    total = store.n_contexts * P if max_tokens is None else min(max_tokens, store.n_contexts * P)
    pool = spread_contexts(-(-total // P), pool_contexts)
    acc = StatsAccumulator(n_latents, k, samples, device, seed, simple, reservoir, pool)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="analyze", disable=not progress)
    group = max(1, batch_tokens // P)
    for acts, addr in store.iter_token_rows(hook):
        c0, c1 = int(addr[0, 0]), int(addr[-1, 0]) + 1
        tokens = torch.from_numpy(store.tokens(c0, c1)).to(device)
        for g0 in range(0, c1 - c0, group):
            g1 = min(g0 + group, c1 - c0)
            if max_tokens is not None and acc.n_tokens >= max_tokens:
                break
            x = torch.from_numpy(acts[g0 * P : g1 * P]).to(device).float()
            z = encode(x)
            if isinstance(z, torch.Tensor):
                z = z.float().view(g1 - g0, P, n_latents)
            acc.update(z, tokens[g0:g1], c0 + g0)
            bar.update((g1 - g0) * P)
        if max_tokens is not None and acc.n_tokens >= max_tokens:
            break
    bar.close()
    return acc.result()
