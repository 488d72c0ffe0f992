"""`saepipe harvest`: harvest, then print a one-line summary."""

from __future__ import annotations

from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.harvester import harvest
from saepipe.harvest.store import disk_bytes


def run(cfg: HarvestConfig) -> int:
    res = harvest(cfg)
    if res.already_complete:
        print(f"store {res.path} is already complete ({res.n_tokens:,} tokens); nothing to do")
        return 0
    size = disk_bytes(res.path)
    rate = res.tokens_written_now / max(res.seconds, 1e-9)
    print(
        f"harvested {res.n_tokens:,} tokens ({res.n_contexts:,} contexts) into {res.path}: "
        f"{size / 2**20:,.1f} MiB on disk, {rate:,.0f} tokens/s"
    )
    return 0
