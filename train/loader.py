"""Streaming, shuffled, resumable batches of activations from one or more stores.

The stream of one rank is defined by pure functions, so it can be rebuilt from a small position:

- `assign_chunks(n_chunks, rank, world, seed, epoch)`: a seeded permutation of all chunks per epoch,
  dealt round-robin to ranks, so the union over ranks is every chunk exactly once per epoch.
- A rank's chunks of an epoch are grouped into *windows* of `chunks_per_window` chunks (the mixing
  buffer, `buffer_tokens` worth); a window's token rows are permuted with a generator seeded by
  (seed, epoch, rank, window).
- Batches are consecutive `batch_size` rows of the concatenated windows, epoch after epoch without end.

Which rows enter (issue 19, data hygiene): every position of every committed context, except position 0
when it holds a prepended BOS (`drop_bos`), positions holding a special token (`drop_special`: the
store's BOS/EOS ids plus `special_token_ids`) and positions whose norm exceeds `drop_norm_above` times
the store's median norm (saepipe.harvest.norms). The filter is a pure function of a chunk's bytes, so the
stream stays deterministic and resumable. `token_norm` then scales every row to norm sqrt(d_model)
(SAELens's constant_norm_rescale, undone by the saved SAE dir's loader).

`StreamPosition(epoch, window, offset)` names the next unread row; every `Batch` carries the position
after it, so a checkpoint that stores it resumes the exact stream. A background thread reads and
permutes the next windows while the trainer works; memory is bounded by (prefetch + 1) windows.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from saepipe.errors import SaepipeError
from saepipe.harvest import open_store
from saepipe.harvest.norms import median_norm, row_norms
from saepipe.train.token_norm import token_normalize


def assign_chunks(n_chunks: int, rank: int, world: int, seed: int, epoch: int) -> np.ndarray:
    """Chunk indices rank `rank` of `world` reads in epoch `epoch`, in reading order (int64)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    order = np.random.default_rng([seed, epoch]).permutation(n_chunks)
    return order[rank::world]


@dataclass(frozen=True)
class StreamPosition:
    """The next unread row: `offset` rows into window `window` of epoch `epoch` (for this rank)."""

    epoch: int = 0
    window: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StreamPosition:
        return cls(int(d["epoch"]), int(d["window"]), int(d["offset"]))


@dataclass
class Batch:
    """`x` [batch_size, d_model] float32 on the loader's device (normalised if asked), `addresses`
    [batch_size, 3] int64 numpy (store index, context, position), and the stream position after it."""

    x: torch.Tensor
    addresses: np.ndarray
    position: StreamPosition


@dataclass
class _Window:
    epoch: int
    window: int
    rows: np.ndarray  # [m, d_model] float32
    addresses: np.ndarray  # [m, 3] int64


class ActivationLoader:
    """Batches of one hook's activations from several stores, for one rank of `world`."""

    def __init__(
        self,
        stores: list[str],
        hook: str,
        batch_size: int,
        buffer_tokens: int = 262_144,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_bos: bool = True,
        normalize: bool = False,
        device: str | torch.device = "cpu",
        prefetch: int = 2,
        follow: bool = False,
        drop_special: bool = False,
        special_token_ids: Sequence[int] = (),
        drop_norm_above: float | None = None,
        token_norm: bool = False,
    ):
        if not stores:
            raise SaepipeError("give at least one --store")
        if follow and world > 1:
            raise SaepipeError("--follow reads a growing store in one process; run it without the launcher")
        self.follow = follow
        self.stores = [open_store(str(p), allow_incomplete=follow) for p in stores]
        self.hook, self.batch_size, self.seed = hook, batch_size, seed
        self.rank, self.world, self.device, self.prefetch = rank, world, torch.device(device), prefetch
        first = self.stores[0]
        for s in self.stores:
            s.stats(hook)  # raises a one-line SaepipeError naming the hooks the store has
            if s.d_model != first.d_model:
                raise SaepipeError(
                    f"stores disagree on d_model: {first.path} has {first.d_model}, {s.path} has {s.d_model}; "
                    "train on stores harvested from the same model"
                )
        self.d_model = first.d_model
        self.chunks = self._committed_chunks()
        self._epoch_chunks: dict[int, list[tuple[int, int, int]]] = {0: self.chunks}
        self._lock = threading.Lock()
        while follow and not self.chunks:  # nothing committed yet: wait for the harvester's first shard
            time.sleep(1.0)
            self.chunks = self._epoch_chunks[0] = self._committed_chunks(refresh=True)
        if len(self.chunks) < world:
            raise SaepipeError(
                f"the stores hold {len(self.chunks)} chunks, fewer than the {world} ranks; use fewer "
                "processes or harvest with a smaller --contexts-per-chunk"
            )
        self.first_pos = [s.info.first_position if drop_bos else 0 for s in self.stores]
        self.special = [
            np.asarray(sorted({*s.special_token_ids, *special_token_ids}) if drop_special else [], np.int64)
            for s in self.stores
        ]
        self.max_norm = [
            None if drop_norm_above is None else drop_norm_above * median_norm(s, hook) for s in self.stores
        ]
        self.token_norm = token_norm
        rows_per_chunk = max((b - a) * (s.context_size - f) for (i, a, b), s, f in self._chunk_info())
        self.chunks_per_window = max(1, buffer_tokens // max(rows_per_chunk, 1))
        self.scale = self._scale() if normalize else 1.0

    def _committed_chunks(self, refresh: bool = False) -> list[tuple[int, int, int]]:
        if refresh:
            for s in self.stores:
                if not s.complete:
                    s.refresh()
        return [(i, a, b) for i, s in enumerate(self.stores) for a, b in s.chunk_bounds()]

    def chunks_of(self, epoch: int) -> list[tuple[int, int, int]]:
        """(store, start, stop) of every chunk read in `epoch`. With `follow`, each epoch takes the chunks
        committed when it starts, so a store still being harvested enters the stream epoch by epoch."""
        if not self.follow:
            return self.chunks
        with self._lock:  # the reader thread and the consumer must agree on an epoch's chunks
            if epoch not in self._epoch_chunks:
                self._epoch_chunks[epoch] = self._committed_chunks(refresh=True)
                for old in [e for e in self._epoch_chunks if e < epoch - 2]:
                    del self._epoch_chunks[old]
            return self._epoch_chunks[epoch]

    def windows_per_epoch(self, epoch: int = 0) -> int:
        n = len(assign_chunks(len(self.chunks_of(epoch)), self.rank, self.world, self.seed, epoch))
        return math.ceil(n / self.chunks_per_window)

    def _chunk_info(self):
        for i, a, b in self.chunks:
            yield (i, a, b), self.stores[i], self.first_pos[i]

    def _scale(self) -> float:
        """Factor making the mean squared norm d_model, from the stores' own statistics (issue 3)."""
        stats = [s.stats(self.hook) for s in self.stores]
        count = sum(st.count for st in stats)
        if count == 0:
            raise SaepipeError("the stores have no statistics to normalise with; train without --normalize")
        msn = sum(st.count * st.mean_sq_norm for st in stats) / count
        return math.sqrt(self.d_model / msn)

    @property
    def n_tokens_per_epoch(self) -> int:
        """Rows all ranks together read per epoch."""
        return sum((b - a) * (s.context_size - f) for (_, a, b), s, f in self._chunk_info())

    def window_chunks(self, epoch: int, window: int) -> list[int]:
        mine = assign_chunks(len(self.chunks_of(epoch)), self.rank, self.world, self.seed, epoch)
        c = self.chunks_per_window
        return [int(i) for i in mine[window * c : (window + 1) * c]]

    def load_window(self, epoch: int, window: int) -> _Window:
        """Read a window's chunks and permute its rows (deterministic in seed, epoch, rank, window)."""
        rows, addresses = [], []
        chunks = self.chunks_of(epoch)
        for chunk in self.window_chunks(epoch, window):
            i, a, b = chunks[chunk]
            store, first = self.stores[i], self.first_pos[i]
            acts = store.activations(self.hook, a, b)[:, first:]
            if not np.isfinite(acts).all():  # a poisoned store: say where, never train on it
                c, p = np.argwhere(~np.isfinite(acts).all(axis=-1))[0]
                raise SaepipeError(
                    f"store {store.path}: NaN/inf activation at hook {self.hook}, context {a + int(c)}, position "
                    f"{first + int(p)}; re-harvest that store (`saepipe cache verify` lists every such chunk)"
                )
            ctx, pos = np.meshgrid(np.arange(a, b), np.arange(first, store.context_size), indexing="ij")
            keep = self._keep(i, store.tokens(a, b)[:, first:], acts) if self._filters(i) else slice(None)
            rows.append(acts.reshape(-1, self.d_model)[keep].astype(np.float32))
            addr = np.stack([np.full(ctx.size, i), ctx.ravel(), pos.ravel()], axis=1)
            addresses.append(addr[keep])
        x, addr = np.concatenate(rows), np.concatenate(addresses).astype(np.int64)
        perm = np.random.default_rng([self.seed, epoch, self.rank, window]).permutation(len(x))
        x = x[perm]
        if self.scale != 1.0:
            x *= np.float32(self.scale)
        if self.token_norm:
            x = token_normalize(x)
        return _Window(epoch, window, x, addr[perm])

    def _filters(self, i: int) -> bool:
        return len(self.special[i]) > 0 or self.max_norm[i] is not None

    def _keep(self, i: int, tokens: np.ndarray, acts: np.ndarray) -> np.ndarray:
        """[n_contexts * positions] bool: the rows of one chunk that enter the stream (see module doc)."""
        keep = ~np.isin(tokens, self.special[i]).ravel()
        if self.max_norm[i] is not None:
            keep &= row_norms(acts.reshape(-1, self.d_model)) <= self.max_norm[i]
        return keep

    def _next(self, epoch: int, window: int) -> tuple[int, int]:
        return (epoch, window + 1) if window + 1 < self.windows_per_epoch(epoch) else (epoch + 1, 0)

    def _windows(self, epoch: int, window: int, stop: threading.Event, out: queue.Queue) -> None:
        try:
            while not stop.is_set():
                w = self.load_window(epoch, window)
                while not stop.is_set():
                    try:
                        out.put(w, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                epoch, window = self._next(epoch, window)
        except BaseException as e:  # hand the failure to the consumer instead of dying silently
            out.put(e)

    def batches(self, start: StreamPosition | None = None) -> Iterator[Batch]:
        """Endless batches from `start` (the beginning by default); close the iterator to stop."""
        pos = start or StreamPosition()
        stop = threading.Event()
        windows: queue.Queue = queue.Queue(maxsize=self.prefetch)
        thread = threading.Thread(
            target=self._windows, args=(pos.epoch, pos.window, stop, windows), daemon=True
        )
        thread.start()

        def take() -> _Window:
            item = windows.get()
            if isinstance(item, BaseException):
                raise item
            return item

        try:
            cur, offset = take(), pos.offset
            while True:
                parts, addrs, need = [], [], self.batch_size
                while need:
                    if offset == len(cur.rows):
                        cur, offset = take(), 0
                        continue
                    n = min(need, len(cur.rows) - offset)
                    parts.append(cur.rows[offset : offset + n])
                    addrs.append(cur.addresses[offset : offset + n])
                    offset, need = offset + n, need - n
                after = StreamPosition(cur.epoch, cur.window, offset)
                if offset == len(cur.rows):
                    after = StreamPosition(*self._next(cur.epoch, cur.window), 0)
                x = torch.from_numpy(np.concatenate(parts)).to(self.device)
                yield Batch(x, np.concatenate(addrs), after)
        finally:
            stop.set()
            thread.join(timeout=5)
