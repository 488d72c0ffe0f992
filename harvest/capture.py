"""From the model's hooks to one shard's host arrays in the store's representation (issue 18).

The forward runs batch by batch in the calling thread. Each batch's activations are cast to the storage
dtype and counted for non-finite values on the device that computed them, without waiting for the host:

- CPU: the cast writes straight into the shard's host array (no concatenation afterwards).
- CUDA: the cast runs on the GPU (half the bytes to move for float16/bfloat16), then a non-blocking copy on
  a side stream moves it into a pinned host buffer, so the copy overlaps the next batch's forward. Each
  hook has two pinned shard buffers, used in turn; the writer thread waits on the shard's CUDA event
  before reading one and hands it back when the shard is written. `SAEPIPE_SYNC_HARVEST=1` makes the
  copies blocking and the buffers pageable (the reference path).

`Shard.arrays()` (in the writer thread) refuses non-finite values with one line: NaN/inf the model produced
(with the context), or finite values the cast overflowed (float16 tops out at 65504; with their count).
Nothing non-finite is ever written.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from saepipe.errors import SaepipeError
from saepipe.harvest import hooks as hooklib
from saepipe.harvest.overlap import overlapped

TORCH_STORAGE = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Shard:
    """One shard's contexts and activations on their way to the store."""

    start: int
    """First context of the shard."""
    tokens: np.ndarray  # [n, T] int32
    acts: dict[str, np.ndarray] = field(default_factory=dict)
    """hook -> [n, T, d_model] in the store's representation (uint16 bits for bfloat16)."""
    nonfinite: dict[str, np.ndarray] = field(default_factory=dict)
    """hook -> [n] int64: NaN/inf values the model produced, per context."""
    overflow: dict[str, np.ndarray] = field(default_factory=dict)
    """hook -> [n] int64: finite values the cast to the storage dtype turned into inf, per context."""
    ready: Callable[[], None] | None = None
    """Waits for the device-to-host copies (CUDA); None when the arrays are already filled."""
    release: Callable[[], None] | None = None
    """Hands the pinned buffers back for a later shard; None on CPU."""

    def arrays(self, dtype: str) -> dict[str, np.ndarray]:
        """The activations, once copied and checked; a one-line SaepipeError for anything non-finite."""
        if self.ready is not None:
            self.ready()
        for hook in self.acts:
            bad = np.flatnonzero(self.nonfinite[hook])
            if bad.size:
                raise SaepipeError(
                    f"the model produced NaN/inf at hook {hook} in context {self.start + int(bad[0])}; "
                    "check the model weights"
                )
            if n := int(self.overflow[hook].sum()):
                where = self.start + np.flatnonzero(self.overflow[hook])
                top = float(torch.finfo(TORCH_STORAGE[dtype]).max)
                raise SaepipeError(
                    f"{n:,} activation values at hook {hook} overflow {dtype} (|x| > {top:g}) in contexts "
                    f"[{where[0]}, {where[-1] + 1}); rerun with --dtype bfloat16 (same size, float32's range) "
                    "or float32, into a new --out"
                )
        return self.acts

    def done(self) -> None:
        if self.release is not None:
            self.release()


class Capture:
    """Runs shards through the model and captures the hooks' activations (one per harvest)."""

    def __init__(self, model: Any, resolved: dict[str, str], stop: int | None, cfg: Any):
        self.model, self.resolved, self.stop = model, resolved, stop
        self.batch_size, self.dtype = cfg.batch_size, cfg.dtype
        self.device = next(model.bridge.original_model.parameters()).device
        self.shape = (cfg.contexts_per_chunk * cfg.chunks_per_shard, cfg.context_size, model.d_model)
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pool: queue.Queue | None = None

    def _buffers(self, n: int) -> tuple[dict[str, torch.Tensor], Callable[[], None] | None]:
        """Host tensors for `n` contexts of every hook, in the storage dtype, and how to hand them back
        (CUDA: a pool of two pinned shard buffers per hook, allocated once; pinning is slow)."""
        dtype = TORCH_STORAGE[self.dtype]
        if not self.cuda:
            return {h: torch.empty((n, *self.shape[1:]), dtype=dtype) for h in self.resolved}, None
        if self._pool is None:
            self._pool = queue.Queue()
            for _ in range(2):  # one shard being written while the next is computed
                self._pool.put(
                    {h: torch.empty(self.shape, dtype=dtype, pin_memory=overlapped()) for h in self.resolved}
                )
        bufs = self._pool.get()  # waits for the writer to finish with an older shard
        pool = self._pool
        return {h: b[:n] for h, b in bufs.items()}, lambda: pool.put(bufs)

    @torch.inference_mode()
    def run(self, start: int, tokens: np.ndarray) -> Shard:
        """Activations of every hook for one shard's contexts, computed batch by batch from its start
        (the same batches every run feeds the model, so a resumed store is byte-identical)."""
        n = len(tokens)
        host, release = self._buffers(n)
        shard = Shard(start, tokens, {h: _numpy_view(t) for h, t in host.items()}, release=release)
        counts = {h: torch.zeros((2, n), dtype=torch.int64, device=self.device) for h in self.resolved}
        with hooklib.recording(self.model.bridge, self.resolved) as recorded:
            for b in range(0, n, self.batch_size):
                batch = torch.from_numpy(tokens[b : b + self.batch_size]).long().to(self.device)
                self.model.bridge(batch, return_type=None, stop_at_layer=self.stop)
                for h, x in recorded.items():
                    self._store(x, host[h][b : b + len(batch)], counts[h][:, b:])
        self._finish(shard, counts)
        return shard

    def _store(self, x: torch.Tensor, host: torch.Tensor, counts: torch.Tensor) -> None:
        """Cast one batch's activations `x` [B, T, D] into `host` and count its non-finite values."""
        B = len(x)
        if self.cuda:
            y = x.to(TORCH_STORAGE[self.dtype])
            assert self._stream is not None
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                host.copy_(y, non_blocking=overlapped())
            y.record_stream(self._stream)  # keep y's memory until the side stream has copied it
        else:
            host.copy_(x)  # the cast, straight into the shard's array
            y = host
        src = (~torch.isfinite(x)).flatten(1).sum(1)
        counts[0, :B] = src
        counts[1, :B] = (~torch.isfinite(y)).flatten(1).sum(1) - src  # finite values the cast made inf

    def _finish(self, shard: Shard, counts: dict[str, torch.Tensor]) -> None:
        """Bring the counts to the host; on CUDA without waiting, behind an event the writer waits on."""
        if not self.cuda:
            for h, c in counts.items():
                shard.nonfinite[h], shard.overflow[h] = c.numpy()
            return
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            host = {
                h: torch.empty(c.shape, dtype=c.dtype, pin_memory=overlapped()) for h, c in counts.items()
            }
            for h, c in counts.items():
                host[h].copy_(c, non_blocking=overlapped())
                c.record_stream(self._stream)
            event = torch.cuda.Event()
            event.record(self._stream)
        for h, c in host.items():
            shard.nonfinite[h], shard.overflow[h] = c.numpy()
        shard.ready = event.synchronize


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A host tensor's memory as the store's numpy representation (bfloat16 -> uint16 bits), no copy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()
