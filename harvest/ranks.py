"""Several harvest processes on one store: who computes which shard, and how shards get committed.

Under `torchrun` / `accelerate launch` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) every rank
computes a disjoint set of shards, writes their arrays, and leaves a small marker with the shard's
partial statistics in `<store>/.pending/`. Rank 0 holds the store's lease and commits shards strictly in
order from those markers, so the store never claims a shard that is not fully written and ends with the
same bytes as a one-process harvest (the markers are removed when it completes). No process group is
needed: the markers are the only channel, on a local disk or an object store alike. No wait is endless: a
rank that sees no progress for `--rank-timeout` seconds stops with an error, keeping what was committed.

Each rank overlaps like the one-process harvest (harvester.py): packing runs ahead, and a shard's write,
its marker and (on rank 0) the commits of every shard that is ready run in the writer thread behind the
next shard's forward.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from tqdm import tqdm

from saepipe.errors import SaepipeError
from saepipe.harvest.capture import Capture, Shard
from saepipe.harvest.corpus import shard_tokens
from saepipe.harvest.devices import RankInfo
from saepipe.harvest.lease import Lease
from saepipe.harvest.overlap import Behind, ahead
from saepipe.harvest.store import StoreWriter, shard_stats, store_complete

PENDING = ".pending"


def shards_for_rank(first: int, n_shards: int, rank: int, world: int) -> list[int]:
    """Rank r's shards among [first, n_shards): those equal to r modulo world.

    The dealing is fixed by the shard number alone, so ranks that look at the store at different moments
    (and see different commit points `first`) still never take the same shard; round-robin keeps every
    rank near the commit point, so rank 0 can commit while the others work."""
    return [s for s in range(rank, n_shards, world) if s >= first]


class Markers:
    """`<store>/.pending/<shard>.json`: written after a shard's arrays, read and removed by rank 0."""

    def __init__(self, store: str):
        self.fs, root = fsspec.core.url_to_fs(store)
        self.dir = f"{root.rstrip('/')}/{PENDING}"

    def _path(self, shard: int) -> str:
        return f"{self.dir}/{shard}.json"

    def put(self, shard: int, n_rows: int, stats: dict) -> None:
        self.fs.makedirs(self.dir, exist_ok=True)
        tmp = self._path(shard) + ".partial"
        self.fs.pipe_file(tmp, json.dumps({"rows": n_rows, "stats": stats}).encode())
        self.fs.mv(tmp, self._path(shard))  # a marker is whole or absent

    def get(self, shard: int) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._path(shard)))
        except FileNotFoundError:
            return None

    def count(self) -> int:
        """Markers present (a new one is progress for a waiting rank 0); listed afresh, never from a cache."""
        self.fs.invalidate_cache(self.dir)
        try:
            names = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return 0
        return sum(1 for n in names if n.endswith(".json") and not n.endswith("/go.json"))

    def has(self, shard: int) -> bool:
        return self.fs.exists(self._path(shard))

    def clear(self) -> None:
        if self.fs.exists(self.dir):
            self.fs.rm(self.dir, recursive=True)

    def put_go(self, job: str) -> None:
        """Rank 0 has the store open: the other ranks of launch `job` may write."""
        self.fs.makedirs(self.dir, exist_ok=True)
        self.fs.pipe_file(f"{self.dir}/go.json", json.dumps({"job": job}).encode())

    def go(self) -> str | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.dir}/go.json"))["job"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None


@dataclass(frozen=True)
class RankedRun:
    n_contexts: int
    """Contexts committed in the store (as rank 0 last saw it on a non-zero rank)."""
    written: int
    """Contexts this rank computed and wrote in this run."""
    seconds: float
    already_complete: bool = False


def write_ranked(
    out: str,
    settings: dict,
    cfg: Any,
    capture: Capture,
    contexts: Iterator[np.ndarray],
    progress: bool,
    ranks: RankInfo,
    lease: Lease | None = None,
) -> RankedRun:
    """This rank's shards, in order; rank 0 (under the store's `lease`) commits every rank's shards."""
    job = _job_id()
    markers = Markers(out)
    if ranks.rank > 0:
        _wait_for_go(markers, job, ranks.rank, cfg.rank_timeout, out)
    writer = StoreWriter(out, settings, owner=ranks.rank == 0, lease=lease)  # refuses other settings
    if writer.complete:  # nothing to write: no go-ahead (the other ranks see the store complete)
        if ranks.rank == 0:
            markers.clear()  # a go-ahead an earlier launch left
        return RankedRun(writer.n_contexts, 0, 0.0, already_complete=True)
    if ranks.rank == 0:
        markers.put_go(job)
    target, per, T = writer.settings["n_contexts_target"], writer.shard_contexts, cfg.context_size
    first_pos = 1 if cfg.prepend_bos else 0
    bar = tqdm(total=target * T, initial=writer.n_contexts * T, unit="tok", unit_scale=True, desc="harvest",
               disable=not (progress and ranks.rank == 0))  # fmt: skip
    written = 0

    def write(shard: int, part: Shard | None) -> None:  # in the writer thread
        nonlocal written
        rows = 0 if part is None else len(part.tokens)
        stats = {}
        if part is not None:
            try:
                acts = part.arrays(cfg.dtype)
                with writer.out_of_space(part.start, rows):
                    writer.write_data(part.start, part.tokens, acts)
                stats = shard_stats(acts, first_pos, cfg.dtype)
            finally:
                part.done()
        markers.put(shard, rows, stats)  # after the data: rank 0 commits what a marker announces
        written += rows
        if ranks.rank == 0:
            _commit_ready(writer, markers, per)
        bar.update(rows * T * ranks.world)

    t0 = time.perf_counter()
    # A shard with a marker was written by an earlier run of this job; rank 0 commits it from the marker.
    todo = shards_for_rank(writer.n_contexts // per, -(-target // per), ranks.rank, ranks.world)
    mine = [s for s in todo if not markers.has(s)]
    packed = ahead(shard_tokens(contexts, mine, per, target))
    with contextlib.closing(packed), Behind() as behind:
        for part in packed:
            computed = capture.run(part.start, part.tokens) if len(part.tokens) else None
            behind.submit(write, part.shard, computed)
    if ranks.rank > 0:
        return RankedRun(writer.n_contexts, written, time.perf_counter() - t0)
    try:
        _commit_the_rest(writer, markers, per, ranks.world, cfg.rank_timeout)
    finally:
        bar.close()  # an error then starts on a line of its own
    markers.clear()
    writer.finish()
    return RankedRun(writer.n_contexts, written, time.perf_counter() - t0)


def _commit_the_rest(writer: StoreWriter, markers: Markers, per: int, world: int, timeout: float) -> None:
    """Rank 0, its own shards written: commit the other ranks' shards as their markers arrive.

    A rank that died or hangs would keep rank 0 waiting for ever, so once no new marker has appeared for
    `timeout` seconds it stops with an error. Everything committed stays committed and every marker stays,
    so rerunning the launch commits those shards without recomputing them and ends with the same bytes."""
    seen, since = markers.count(), time.monotonic()
    while not _commit_ready(writer, markers, per):
        if (now := markers.count()) != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since > timeout:
            shard = writer.n_contexts // per
            raise SaepipeError(
                f"harvest rank 0: no shard arrived from the other ranks in {timeout:g}s (shard {shard}, rank "
                f"{shard % world}'s, is next); the {writer.n_contexts} contexts committed and the shards written "
                "are kept: check that rank's output, then rerun the launch to resume (--rank-timeout sets the wait)"
            )
        time.sleep(0.2)


def _commit_ready(writer: StoreWriter, markers: Markers, per: int) -> bool:
    """Commit, in order, every shard whose marker is there; True once nothing is left to commit."""
    target = writer.settings["n_contexts_target"]
    while writer.n_contexts < target:
        shard = writer.n_contexts // per
        marker = markers.get(shard)
        if marker is None:
            return False
        if marker["rows"]:
            writer.commit(marker["rows"], marker["stats"])
        if marker["rows"] < min(per, target - shard * per):
            return True  # the dataset ran out here
    return True


def _job_id() -> str:
    """Names one launch of a multi-process harvest, so ranks ignore a go-ahead left by a killed one."""
    env = os.environ
    return env.get("TORCHELASTIC_RUN_ID") or f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


def _wait_for_go(markers: Markers, job: str, rank: int, timeout: float, out: str) -> None:
    """Non-zero ranks start writing only after rank 0 has opened (or created) the store under its lease,
    or go on at once to a store that is already complete (rank 0 gives no go-ahead for one: it may have
    found it so while waiting for another harvester's lease)."""
    start = time.monotonic()
    while markers.go() != job and not store_complete(out):
        if time.monotonic() - start > timeout:
            raise SaepipeError(
                f"harvest rank {rank}: rank 0 gave no go-ahead in {timeout:g}s (it opens the store under its "
                "lease first); check rank 0's output, then rerun the launch (--rank-timeout sets the wait)"
            )
        time.sleep(0.2)
