"""`saepipe harvest`: harvest, then print a one-line summary."""

from __future__ import annotations

from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.devices import rank_info
from saepipe.harvest.harvester import HarvestResult, harvest
from saepipe.harvest.store import disk_bytes


def summary(res: HarvestResult) -> str:
    if res.repaired_shards and res.tokens_written_now == 0:
        return (
            f"repaired {res.repaired_shards} damaged shard(s) of store {res.path}; every chunk now verifies"
        )
    if res.already_complete:
        return f"store {res.path} is already complete ({res.n_tokens:,} tokens); nothing to do"
    rate = res.tokens_written_now / max(res.seconds, 1e-9)
    return (
        f"harvested {res.n_tokens:,} tokens ({res.n_contexts:,} contexts) into {res.path}: "
        f"{disk_bytes(res.path) / 2**20:,.1f} MiB on disk, {rate:,.0f} tokens/s"
    )


def run(cfg: HarvestConfig) -> int:
    res = harvest(cfg)
    if rank_info().rank == 0:  # under a launcher, rank 0 commits the store and speaks for the job
        print(summary(res))
    return 0
