"""Several harvest processes on one store end byte-identical to one process; shard dealing is a partition."""

from __future__ import annotations

import subprocess
import sys

from helpers import tree_digest
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
