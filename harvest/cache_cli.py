"""`saepipe cache ls | info KEY | verify KEY | rm KEY`: what a cache holds, and whether it is intact.

`info` also reports, under "norms", each hook's activation norm statistics (saepipe.harvest.norms): the
median norm, how much of the squared norm sits in outlier positions, and which tokens, positions and
dimensions those are.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Literal

from pydantic import Field, model_validator

from saepipe.config import StageConfig
from saepipe.errors import SaepipeError
from saepipe.harvest import cache as cachelib
from saepipe.harvest.norms import describe, norm_stats
from saepipe.harvest.store import open_store


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
        found = cachelib.entry(root, cfg.key)
        store = open_store(found.url, allow_incomplete=True)
        decode = local_decoder(store.settings["model"]["name"])
        norms = {
            hook: {
                "recorded": bool((store.meta.get("norms") or {}).get(hook)),  # else computed now
                "summary": describe(norm_stats(store, hook), decode),
            }
            for hook in store.hooks
        }
        print(json.dumps(asdict(found) | {"norms": norms}, indent=2, ensure_ascii=False))
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


def local_decoder(model: str):
    """`decode(ids) -> texts` with the model's tokenizer when it is on this machine (no network), else None:
    token ids are then shown as ids."""
    from saepipe.harvest.models import local_checkpoint

    try:
        from transformers import AutoTokenizer

        local = local_checkpoint(model)
        tok = AutoTokenizer.from_pretrained(str(local) if local else model, local_files_only=True)
    except (OSError, ValueError, SaepipeError):
        return None
    return lambda ids: [tok.decode([i]) for i in ids]
