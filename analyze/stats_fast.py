"""Fast paths of the statistics pass (saepipe.analyze.stats), equal to its simple references bit for bit.

The simple references (`contexts.RunningTopK`, `torch.nonzero(z > 0)` in stats.py) stay; `SAEPIPE_SIMPLE_STATS=1`
switches back to them, and tests/test_analyze_stats.py checks that both give identical results.

- `active_entries`: the active (row, latent) pairs of a dense latent matrix in row-major order, like
  `torch.nonzero(z > 0)`, found in two levels: a max over blocks of 32 latents (one vectorised pass over
  the matrix), then a scan of only the blocks that hold an active entry. An SAE's codes are sparse (tens
  active out of thousands), so most blocks are skipped; a plain `nonzero(z > 0)` costs ~2-4x more on CPU
  at 16k latents (measured), because the comparison and the scan each walk the whole matrix.
- `SlottedTopK`: the running top-k of contexts.py without the per-group full sort. The reference merges by
  two argsorts over all k x latents kept entries plus the candidates, then rebuilds every field, windows
  included ([k, latents, 20] twice per group). Here each latent keeps its k entries in fixed physical slots
  and only a small rank -> slot table moves: a group sorts its candidates once (one int64 key: latent,
  then key descending), merges the k best of each touched latent with its k kept keys (a [touched, 2k]
  row sort), and writes the survivors into the slots of the entries they evict.
- `one_thread`: the bookkeeping on ~1e5-element tensors runs on one CPU thread (see its docstring).

Why the order is the same as the reference's: the reference keeps each latent's entries ordered by key
descending, ties going to the entry seen first (old kept entries precede new candidates, candidates come
in stream order, and its sorts are stable). Both merges here are stable sorts that list old entries before
new ones and candidates in stream order, so the kept sets and their rank order are identical, and
`stats.ranked_context_set` applies the same final sort to the entries of both in that rank order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

BLOCK = 32
"""Latents per block in `active_entries` (a max over 32 contiguous floats vectorises well on CPU)."""


def simple_stats() -> bool:
    """True when `SAEPIPE_SIMPLE_STATS=1`: use the simple references (contexts.py, stats.py) instead of these paths."""
    return os.environ.get("SAEPIPE_SIMPLE_STATS", "0") not in ("", "0", "false", "False")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside the block (restored after).

    The bookkeeping works on tensors of ~1e5 elements; split over threads, each op waits at a barrier for
    its slowest thread, and on a busy machine (more runnable threads than cores) that wait is a scheduler
    time slice: measured ~60 ms instead of ~0.6 ms per elementwise op on 2 shared cores. On one thread
    the same ops lose at most the (small) parallel speed-up. No effect on CUDA ops.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def active_entries(z_NL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, latents) where z_NL > 0, in row-major order: exactly `torch.nonzero(z_NL > 0, as_tuple=True)`."""
    N, L = z_NL.shape
    if L % BLOCK or not z_NL.is_contiguous():
        return torch.nonzero(z_NL > 0, as_tuple=True)
    z_NBS = z_NL.view(N, L // BLOCK, BLOCK)
    bmax_NB = z_NBS.amax(2)  # the one pass over the whole matrix: on all threads
    with one_thread():
        # a block may hold an active entry unless its max is <= 0 (amax propagates NaN: NaN blocks are kept)
        r, b = torch.nonzero(~(bmax_NB <= 0), as_tuple=True)
        j, s = torch.nonzero(z_NBS[r, b] > 0, as_tuple=True)  # row-major in (block row, slot) = (row, latent)
        return r[j], b[j] * BLOCK + s


def _descending_bits(keys: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) that sorts ascending as `keys` (float32, no NaN) sort descending; -0.0 == 0.0."""
    bits = (keys.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into 0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31  # float order -> unsigned order
    return 2**32 - 1 - ordered


class DenseCodes:
    """A group's codes as a dense [rows, latents] matrix, looked up by (row, latent)."""

    def __init__(self, z_NL: torch.Tensor, P: int):
        self.z, self.P, self.L = z_NL.reshape(-1), P, z_NL.shape[1]

    def at(self, rows: torch.Tensor, lats: torch.Tensor) -> torch.Tensor:
        # flat offsets and take: ~2x faster than indexing with two index tensors
        return self.z.take(rows * self.L + lats)

    def windows(self, rows: torch.Tensor, lats: torch.Tensor, before: int, after: int) -> torch.Tensor:
        """[m, before + 1 + after] codes of latent lats[i] at the rows around rows[i] in the same context
        (positions outside it read the context's edge and must be masked by the caller)."""
        offsets = torch.arange(-before, after + 1, device=rows.device)
        p = rows % self.P
        wr = rows[:, None] - p[:, None] + (p[:, None] + offsets).clamp(0, self.P - 1)
        return self.at(wr, lats[:, None].expand_as(wr))


class SparseCodes:
    """A group's codes as its active pairs (row-major, as `SAE.encode_sparse` returns them); 0 elsewhere.

    Looked up by binary search over the sorted flat keys row * L + latent, so no [rows, latents] matrix
    is ever written or scanned: the point of sparse encoding (issue 14).
    """

    def __init__(
        self, rows: torch.Tensor, lats: torch.Tensor, values: torch.Tensor, P: int, L: int, n_rows: int
    ):
        self.keys = rows.long() * L + lats
        self.n_rows = n_rows
        if len(self.keys) > 1 and not bool((self.keys[1:] > self.keys[:-1]).all()):
            raise ValueError("sparse codes must list each (row, latent) once, in row-major order")
        self.values, self.P, self.L = values.float(), P, L

    def at(self, rows: torch.Tensor, lats: torch.Tensor) -> torch.Tensor:
        q = rows.long() * self.L + lats
        if len(self.keys) == 0:
            return torch.zeros(q.shape, device=q.device)
        i = torch.searchsorted(self.keys, q.reshape(-1)).clamp(max=len(self.keys) - 1).view(q.shape)
        return torch.where(self.keys[i] == q, self.values[i], 0.0)

    def windows(self, rows: torch.Tensor, lats: torch.Tensor, before: int, after: int) -> torch.Tensor:
        """As DenseCodes.windows, from the codes directly: a window of latent l is a range of its active
        rows, so two binary searches per window (in the pairs sorted by latent, then row) find every
        active entry in it, instead of one search per window slot."""
        W = before + 1 + after
        out = torch.zeros(len(rows), W, device=rows.device)
        if len(self.keys) == 0 or len(rows) == 0:
            return out
        if not hasattr(self, "by_lat"):
            rk, lk = self.keys // self.L, self.keys % self.L
            self.by_lat, order = (lk * self.n_rows + rk).sort()
            self.by_lat_values = self.values[order]
        p = rows % self.P
        lo_row = rows - p + (p - before).clamp(min=0)
        hi_row = rows - p + (p + after).clamp(max=self.P - 1)
        base = lats.long() * self.n_rows
        lo = torch.searchsorted(self.by_lat, base + lo_row)
        hi = torch.searchsorted(self.by_lat, base + hi_row, right=True)
        count = hi - lo
        which = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), count)
        entry = torch.repeat_interleave(lo - count.cumsum(0) + count, count) + torch.arange(
            int(count.sum()), device=rows.device
        )
        r = self.by_lat[entry] % self.n_rows
        out[which, r - rows[which] + before] = self.by_lat_values[entry]
        return out


class SlottedTopK:
    """Drop-in for contexts.RunningTopK: per latent the k entries with the largest keys, in fixed slots."""

    def __init__(self, n_latents: int, k: int, device: torch.device, window: tuple[int, int]):
        self.k = k
        self.before, self.after = window
        W = self.before + 1 + self.after
        f = {"device": device}
        self.keys = torch.full((n_latents, k), -torch.inf, **f)  # [L, k] by rank: key descending
        self.slot = torch.arange(k, **f).repeat(n_latents, 1)  # [L, k] physical slot of each rank
        self.values = torch.full((n_latents, k), torch.nan, **f)  # [L, k] by physical slot, as below
        self.contexts = torch.full((n_latents, k), -1, dtype=torch.long, **f)
        self.positions = torch.full((n_latents, k), -1, dtype=torch.long, **f)
        self.win_tokens = torch.full((n_latents, k, W), -1, dtype=torch.int32, **f)
        self.win_acts = torch.full((n_latents, k, W), torch.nan, **f)

    @property
    def threshold(self) -> torch.Tensor:
        """[L] the k-th largest key so far (-inf until k entries are kept): only larger keys can enter."""
        return self.keys[:, -1]

    def update(
        self,
        rows: torch.Tensor,
        lats: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        codes: DenseCodes | SparseCodes,
        tokens_CT: torch.Tensor,
        ctx0: int,
    ) -> None:
        """Merge candidates (row of the group's codes, latent, key) with their code `values`, rows ascending
        per latent; as RunningTopK, which reads the values and windows from a dense z instead of `codes`."""
        if len(rows) == 0:
            return
        k, dev = self.k, self.keys.device
        # 1. candidates by latent, then key descending, then stream order (a stable sort of one int64)
        order = ((lats.long() << 32) | _descending_bits(keys)).sort(stable=True).indices
        lat_s, key_s, row_s, val_s = lats[order], keys[order].float(), rows[order], values[order]
        touched, inverse, counts = torch.unique_consecutive(lat_s, return_inverse=True, return_counts=True)
        rank = torch.arange(len(lat_s), device=dev) - (counts.cumsum(0) - counts)[inverse]
        best = rank < k  # only a latent's k best candidates can enter
        u = len(touched)
        cand_keys = torch.full((u, k), -torch.inf, device=dev)
        cand_keys[inverse[best], rank[best]] = key_s[best]
        cand_src = torch.zeros((u, k), dtype=torch.long, device=dev)
        cand_src[inverse[best], rank[best]] = torch.nonzero(best).squeeze(1)

        # 2. merge with the kept keys: old ranks first, so ties go to the entry seen first
        old_keys, old_slot = self.keys[touched], self.slot[touched]  # [u, k]
        merged, idx = torch.cat([old_keys, cand_keys], 1).sort(dim=1, descending=True, stable=True)
        merged, idx = merged[:, :k], idx[:, :k]
        is_new = idx >= k
        n_new = is_new.sum(1, keepdim=True)
        # the kept old entries are old ranks 0..k-n_new-1 in order; the new take the evicted ranks' slots
        nth_new = is_new.long().cumsum(1) - 1
        freed = old_slot.gather(1, (k - n_new + nth_new).clamp(0, k - 1))
        kept = old_slot.gather(1, idx.clamp(max=k - 1))
        self.keys[touched] = merged
        self.slot[touched] = torch.where(is_new, freed, kept)

        # 3. write the entering candidates into their slots, with values, addresses and windows
        ui, _ = torch.nonzero(is_new, as_tuple=True)
        lat, slot = touched[ui], freed[is_new]
        src = cand_src.gather(1, (idx - k).clamp(min=0))[is_new]
        row = row_s[src]
        P = codes.P
        T = tokens_CT.shape[1]
        first = T - P
        c, p = row // P, first + row % P
        dst = lat * k + slot  # flat (latent, slot) index
        self.values.view(-1)[dst] = val_s[src].float()
        self.contexts.view(-1)[dst] = ctx0 + c
        self.positions.view(-1)[dst] = p
        wp = p[:, None] + torch.arange(-self.before, self.after + 1, device=dev)  # [m, W] positions
        in_ctx = (wp >= 0) & (wp < T)
        has_act = (wp >= first) & in_ctx
        W = wp.shape[1]
        tok = tokens_CT.reshape(-1).take(c[:, None] * T + wp.clamp(0, T - 1))
        self.win_tokens.view(-1, W).index_copy_(0, dst, torch.where(in_ctx, tok, -1))
        acts = codes.windows(row, lat, self.before, self.after)  # [m, W], slots outside masked below
        self.win_acts.view(-1, W).index_copy_(0, dst, torch.where(has_act, acts, torch.nan))

    def ranked(self) -> dict[str, torch.Tensor]:
        """Every field as [k, L(, W)] in rank order: the layout of RunningTopK's fields."""
        s = self.slot
        W = self.win_tokens.shape[2]
        s3 = s[..., None].expand(-1, -1, W)
        return {
            "values": self.values.gather(1, s).T,
            "contexts": self.contexts.gather(1, s).T,
            "positions": self.positions.gather(1, s).T,
            "win_tokens": self.win_tokens.gather(1, s3).permute(1, 0, 2),
            "win_acts": self.win_acts.gather(1, s3).permute(1, 0, 2),
        }
