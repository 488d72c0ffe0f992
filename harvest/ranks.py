"""Several harvest processes on one store: who computes which shard, and how shards get committed.

Under `torchrun` / `accelerate launch` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) every rank
computes a disjoint set of shards, writes their arrays, and leaves a small marker with the shard's
partial statistics in `<store>/.pending/`. Rank 0 holds the store's lease and commits shards strictly in
order from those markers, so the store never claims a shard that is not fully written and ends with the
same bytes as a one-process harvest (the markers are removed when it completes). No process group is
needed: the markers are the only channel, on a local disk or an object store alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import fsspec

PENDING = ".pending"


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int


def rank_info() -> RankInfo:
    env = os.environ
    return RankInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


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
