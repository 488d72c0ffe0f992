"""What each latent's explanation is built from and what it is scored on, never the same contexts.

The split is by context parity: contexts with an even index BUILD explanations, odd ones are HELD OUT.
From the statistics pass (saepipe.analyze.stats) a latent has its top-k windows, a uniform reservoir of
active windows, and the whole codes of a pool of contexts spread over the store (half even, half odd):

    build     top-k and reservoir windows in even contexts (what the latent does at its peak and
              typically), and every position of the even pool contexts (how often each n-gram occurs
              without the latent: the explainer's negatives)
    held out  reservoir windows in odd contexts: a uniform sample of active positions, so weak and strong
              activations in proportion (delphi samples activation quantiles for the same reason); and the
              odd pool contexts cut into windows of the same length: windows where the latent is inactive
              throughout are the detection negatives (delphi's "random non-activating" examples)

A rare latent therefore gets about half its activations to build and half to score; one seen only in odd
contexts has no explanation, one seen only in even contexts has no held-out positives (and no score).

Windows are `WINDOW` tokens around a position (saepipe.analyze.stats); an n-gram carries up to two tokens
of left context, so only slots with both left neighbours inside the window are scored (`SCORED_SLOTS`),
the same slots in positive and negative windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saepipe.analyze.contexts import WINDOW, WINDOW_BEFORE, ContextSet
from saepipe.analyze.explain import MAX_CONTEXT, window_keys
from saepipe.analyze.stats import LatentStats

SCORED_SLOTS = slice(MAX_CONTEXT, WINDOW)
"""Window slots whose n-grams are fully inside the window."""


def is_build(contexts: np.ndarray) -> np.ndarray:
    return (np.asarray(contexts) % 2) == 0


@dataclass
class Windows:
    """Token windows of one latent with its activation on each slot (NaN: no value) and addresses."""

    tokens: np.ndarray  # [n, WINDOW] int64, -1 outside the context
    acts: np.ndarray  # [n, WINDOW] float64
    contexts: np.ndarray  # [n] int64
    positions: np.ndarray  # [n] int64: the context position of slot WINDOW_BEFORE

    @property
    def scored(self) -> np.ndarray:
        """[n, WINDOW] bool: slots that are scored (full n-gram context, a token, an activation value)."""
        ok = (self.tokens >= 0) & np.isfinite(self.acts)
        ok[:, : SCORED_SLOTS.start] = False
        return ok


def _windows(cs: ContextSet, latent: int, keep) -> Windows:
    filled = cs.contexts[latent] >= 0
    sel = filled & keep(cs.contexts[latent])
    return Windows(
        cs.window_tokens[latent, sel].astype(np.int64),
        cs.window_acts[latent, sel].astype(np.float64),
        cs.contexts[latent, sel].astype(np.int64),
        cs.positions[latent, sel].astype(np.int64),
    )


def _cat(a: Windows, b: Windows) -> Windows:
    return Windows(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in Windows.__dataclass_fields__))


@dataclass
class Material:
    """One latent's build and held-out material (see the module docstring)."""

    examples: Windows
    """Top-k then reservoir windows in even contexts: what a language-model explainer reads."""
    build: Windows
    """The same without those in pool contexts (the pool counts its contexts whole)."""
    active_keys: np.ndarray  # [A, 3] n-gram keys of every active build position (windows and pool)
    active_acts: np.ndarray  # [A]
    window_keys: np.ndarray  # [B] sorted keys (all three lengths) of scored build-window positions
    window_key_counts: np.ndarray  # [B]
    positives: Windows
    """Held-out reservoir windows (odd contexts), each active at slot WINDOW_BEFORE."""
    pool_acts: np.ndarray  # [n_pool_windows, WINDOW] float64: the latent on the held-out pool windows


class Split:
    """The global part of the split: the pool's n-gram counts and windows, and the pool codes by latent."""

    def __init__(self, stats: LatentStats, first: int):
        """`first`: the first position with an activation (1 when contexts start with BOS)."""
        pool = stats.pool
        if pool is None or stats.reservoir is None:
            raise ValueError(
                "the statistics pass kept no reservoir and pool (pass reservoir= and pool_contexts=)"
            )
        self.stats, self.first = stats, first
        T = pool.tokens.shape[1] if len(pool.tokens) else 0
        self.T = T
        even = is_build(pool.contexts)
        self.build_rows = np.flatnonzero(even)
        self.heldout_rows = np.flatnonzero(~even)
        self.build_contexts = pool.contexts[even]
        # build pool: the keys of every position with a value, counted once
        self.pool_keys = window_keys(pool.tokens)  # [n_pool, T, 3]; true left context (OUTSIDE at 0)
        counted = self.pool_keys[self.build_rows, first:].reshape(-1)
        self.count_keys, self.counts = np.unique(counted, return_counts=True)
        # held-out pool windows: consecutive WINDOW-position pieces of the odd contexts
        self.per_context = (T - first) // WINDOW if T else 0
        starts = first + WINDOW * np.arange(self.per_context)
        idx = starts[:, None] + np.arange(WINDOW)  # [per_context, WINDOW]
        toks = pool.tokens[self.heldout_rows][:, idx].reshape(-1, WINDOW).astype(np.int64)
        self.pool_windows = Windows(
            toks,
            np.zeros(toks.shape),
            np.repeat(pool.contexts[self.heldout_rows], self.per_context),
            np.tile(starts + WINDOW_BEFORE, len(self.heldout_rows)),
        )
        self.pool_window_keys = window_keys(toks)
        # pool codes grouped by latent (CSR)
        order = np.argsort(pool.latent, kind="stable")
        self.code_lat = pool.latent[order]
        self.code_ctx, self.code_pos, self.code_val = (
            pool.context[order],
            pool.position[order],
            pool.value[order],
        )
        self.code_ptr = np.searchsorted(self.code_lat, np.arange(len(stats.n_active) + 1))

    def material(self, latent: int) -> Material:
        s = self.stats
        # build windows: even contexts not in the pool (the pool covers its own contexts whole)
        keep = lambda c: is_build(c) & ~np.isin(c, self.build_contexts)  # noqa: E731
        build = _cat(_windows(s.top, latent, keep), _windows(s.reservoir, latent, keep))
        examples = _cat(_windows(s.top, latent, is_build), _windows(s.reservoir, latent, is_build))
        # scored build-window positions, each (context, position) once
        ok = build.scored
        n, w = np.nonzero(ok)
        pos_key = (build.contexts[n] << 32) + build.positions[n] + w - WINDOW_BEFORE
        _, first_seen = np.unique(pos_key, return_index=True)
        n, w = n[first_seen], w[first_seen]
        keys = window_keys(build.tokens)[n, w]  # [B, 3]
        acts = build.acts[n, w]
        window_keys_u, window_counts = np.unique(keys.ravel(), return_counts=True)

        lo, hi = self.code_ptr[latent], self.code_ptr[latent + 1]
        ctx, pos, val = self.code_ctx[lo:hi], self.code_pos[lo:hi], self.code_val[lo:hi].astype(np.float64)
        rows = np.searchsorted(self.stats.pool.contexts, ctx)
        b = is_build(ctx)
        pool_keys = self.pool_keys[rows[b], pos[b]]
        active_keys = np.concatenate([keys[acts > 0], pool_keys])
        active_acts = np.concatenate([acts[acts > 0], val[b]])

        positives = _windows(s.reservoir, latent, lambda c: ~is_build(c))
        pool_acts = np.zeros((len(self.pool_windows.tokens), WINDOW))
        h = ~b
        rank = np.searchsorted(self.heldout_rows, rows[h])  # row among the odd pool contexts
        piece, slot = np.divmod(pos[h] - self.first, WINDOW)
        inside = piece < self.per_context
        pool_acts[rank[inside] * self.per_context + piece[inside], slot[inside]] = val[h][inside]
        return Material(
            examples, build, active_keys, active_acts, window_keys_u, window_counts, positives, pool_acts
        )

    def match_count(self, mat: Material, keys: np.ndarray) -> np.ndarray:
        """How many build positions (pool and windows, active or not) each n-gram key matches."""
        out = np.zeros(len(keys), dtype=np.int64)
        for table, counts in ((self.count_keys, self.counts), (mat.window_keys, mat.window_key_counts)):
            if len(table):
                i = np.searchsorted(table, keys).clip(max=len(table) - 1)
                out += np.where(table[i] == keys, counts[i], 0)
        return out
