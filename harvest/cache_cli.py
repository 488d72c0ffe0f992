"""`saepipe cache ls | info KEY | verify KEY | rm KEY`: what a cache holds, and whether it is intact."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Literal

from pydantic import Field, model_validator

from saepipe.config import StageConfig
from saepipe.errors import SaepipeError
from saepipe.harvest import cache as cachelib


class CacheConfig(StageConfig):
    action: Literal["ls", "info", "verify", "rm"] = Field(json_schema_extra={"positional": True})
    """ls: list the cached stores; info: one store's contents; verify: read every chunk and check its
    checksum; rm: delete one store."""
    key: str | None = Field(None, json_schema_extra={"positional": True})
    """The store's name as `saepipe cache ls` prints it (needed by info, verify, rm)."""
    cache: str | None = None
    """Cache root (a path or fsspec URL); default $SAEPIPE_CACHE, else ~/.cache/saepipe/cache."""

    @model_validator(mode="after")
    def _needs_key(self) -> CacheConfig:
        if self.action != "ls" and not self.key:
            raise ValueError(f"`saepipe cache {self.action}` needs a KEY from `saepipe cache ls`")
        return self


def run(cfg: CacheConfig) -> int:
    root = cachelib.cache_root(cfg.cache)
    if cfg.action == "ls":
        entries = cachelib.list_entries(root)
        if not entries:
            print(f"no stores cached under {root}")
        for e in entries:
            state = "complete" if e.complete else "partial"
            print(f"{e.name}  {e.n_tokens:>12,} tokens  {e.bytes / 2**20:>9,.1f} MiB  {state:8}  {e.model}  "
                  f"{','.join(e.hooks)}  {e.dataset}")  # fmt: skip
        return 0
    assert cfg.key is not None
    if cfg.action == "info":
        print(json.dumps(asdict(cachelib.entry(root, cfg.key)), indent=2))
        return 0
    if cfg.action == "verify":
        url = cachelib.entry(root, cfg.key).url
        damaged = cachelib.verify(url)
        if damaged:
            raise SaepipeError(
                f"store {cfg.key} is damaged: {'; '.join(damaged)}; rerun the harvest command that made it with --repair (or `saepipe cache rm` it and rerun)"
            )
        print(f"store {cfg.key}: every committed chunk is present and its checksum matches")
        return 0
    print(f"removed {cachelib.remove(root, cfg.key)}")
    return 0
