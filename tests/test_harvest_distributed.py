"""Several harvest processes on one store end byte-identical to one process; shard dealing is a partition."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from helpers import committed, error_lines, tree_digest
from test_harvest import _args, _config

from saepipe.harvest import open_store
from saepipe.harvest.harvester import harvest
from saepipe.harvest.ranks import shards_for_rank


def test_shards_for_rank_is_a_partition():
    for n in range(0, 30):
        for first in range(0, n + 1):
            for world in range(1, 7):
                dealt = [shards_for_rank(first, n, r, world) for r in range(world)]
                flat = sorted(s for d in dealt for s in d)
                assert flat == list(range(first, n)), (first, n, world)
                assert max(map(len, dealt)) - min(map(len, dealt)) <= 1


def test_two_processes_equal_one(tmp_path, tiny_model_dir, small_corpus):
    one, two = tmp_path / "one", tmp_path / "two"
    harvest(_config(_args(tiny_model_dir, small_corpus, one)), progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "-m", "saepipe", "harvest", *_args(tiny_model_dir, small_corpus, two)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert open_store(str(two)).n_contexts == 200
    assert not (two / ".pending").exists()
    assert tree_digest(two) == tree_digest(one)


def _one_rank_of_two(model_dir, corpus, store) -> list[str]:
    return [sys.executable, "-m", "saepipe", "harvest", *_args(model_dir, corpus, store)]


def _run_as(argv: list[str], rank: int) -> subprocess.CompletedProcess:
    """One rank of a two-process launch, started alone (no launcher: the other rank never comes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    env |= {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    env |= {"RANK": str(rank), "LOCAL_RANK": str(rank)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_a_rank_that_never_comes_times_out_and_the_launch_reruns(tmp_path, tiny_model_dir, small_corpus):
    """Rank 1 alone waits for a rank 0 that never starts; rank 0 alone waits for shards rank 1 never writes.

    Each stops after --rank-timeout with one line naming what never arrived, and a full launch afterwards
    resumes from what rank 0 left (committed shard, markers) to the bytes of a one-process harvest."""
    one, store = tmp_path / "one", tmp_path / "store"
    harvest(_config(_args(tiny_model_dir, small_corpus, one)), progress=False)
    argv = [*_one_rank_of_two(tiny_model_dir, small_corpus, store), "--rank-timeout", "2"]

    def alone(rank: int) -> str:
        proc = _run_as(argv, rank)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [x for x in error_lines(proc.stderr) if not x.startswith("harvest: ")]  # rank 0's bar
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return lines[0]

    assert "harvest rank 1: rank 0 gave no go-ahead in 2s" in alone(1)
    assert not store.exists() or not any(store.iterdir())  # a rank > 0 never writes before the go-ahead

    line = alone(0)
    assert "harvest rank 0: no shard arrived from the other ranks in 2s (shard 1, rank 1's, is next)" in line
    assert committed(store) == 8  # shard 0 (rank 0's) committed; its other shards wait as markers
    markers = sorted(p.name for p in (store / ".pending").glob("*.json"))
    assert markers == sorted(["go.json", *(f"{s}.json" for s in range(0, 25, 2))])

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "-m", "saepipe", "harvest", *_args(tiny_model_dir, small_corpus, store)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (store / ".pending").exists()
    assert tree_digest(store) == tree_digest(one)


def test_a_launch_on_a_complete_store_ends_on_every_rank_without_a_go_ahead_and_changes_nothing(
    tmp_path, tiny_model_dir, small_corpus
):
    """Rank 0 writes no go-ahead for a complete store (it may find it so while waiting for another
    harvester's lease), so a rank > 0 must see the store complete and stop at once, not wait out
    --rank-timeout; and rank 0 must leave no `.pending/` behind in it."""
    store = tmp_path / "store"
    harvest(_config(_args(tiny_model_dir, small_corpus, store)), progress=False)
    before = tree_digest(store)
    argv = [*_one_rank_of_two(tiny_model_dir, small_corpus, store), "--rank-timeout", "30"]
    for rank in (1, 0):
        start = time.monotonic()
        proc = _run_as(argv, rank)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert time.monotonic() - start < 30  # did not wait for a go-ahead
        assert not (store / ".pending").exists()
    assert tree_digest(store) == before
