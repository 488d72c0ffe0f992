"""Shared activation caches: stores named by what determines their bytes, found instead of re-harvested.

A cache root is a local directory (default `$SAEPIPE_CACHE`, else ~/.cache/saepipe/cache) or any fsspec
URL (`s3://bucket/prefix`). A store lives at `<root>/stores/<key>-<n_contexts>`, where `key` hashes the
store settings except the context count (model + weights fingerprint, dataset + its fingerprint,
tokenizer, context size, hooks, dtypes, chunking). A request is served by any complete store with the
same key and at least as many contexts: a store with more tokens serves a request for fewer.

Stores written before the dataset fingerprint was part of the settings hash to other keys, so they are
never served again (whether their corpus changed since cannot be known); they stay listed, readable and
removable with `saepipe cache`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from saepipe.errors import SaepipeError
from saepipe.harvest.models import saepipe_home
from saepipe.harvest.store import ACTS, _open_group, from_stored, open_store, store_complete, store_exists

_ENTRY = re.compile(r"[0-9a-f]{20}-[0-9]+")


def cache_root(configured: str | None = None) -> str:
    return configured or os.environ.get("SAEPIPE_CACHE") or str(saepipe_home() / "cache")


def store_key(settings: dict[str, Any]) -> str:
    identity = {k: v for k, v in settings.items() if k != "n_contexts_target"}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _entries(root: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(_join(root, "stores"))
    if not fs.exists(path):
        return []
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return sorted(n for n in names if _ENTRY.fullmatch(n))  # not the `.lock` files beside the stores


def safe_name(name: str) -> str:
    """A cache entry name from a user: one path component, no traversal out of the cache root."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise SaepipeError(f"{name!r} is not a cache key; use a name from `saepipe cache ls`")
    return name


def locate(root: str, settings: dict[str, Any]) -> str:
    """The store that serves `settings`: the smallest complete one big enough, else where to write it."""
    key, want = store_key(settings), int(settings["n_contexts_target"])
    sizes = sorted(int(e.rsplit("-", 1)[1]) for e in _entries(root) if e.rsplit("-", 1)[0] == key)
    for n in sizes:
        url = _join(root, "stores", f"{key}-{n}")
        if n >= want and store_complete(url):
            return url
    return _join(root, "stores", f"{key}-{want}")


@dataclass(frozen=True)
class CacheEntry:
    name: str
    url: str
    n_contexts: int
    n_tokens: int
    complete: bool
    bytes: int
    model: str
    hooks: list[str]
    dataset: str


def entry(root: str, name: str) -> CacheEntry:
    from saepipe.harvest.store import disk_bytes

    url = _join(root, "stores", safe_name(name))
    if not store_exists(url):
        raise SaepipeError(f"no cached store named {name} under {root}; see `saepipe cache ls`")
    s = open_store(url, allow_incomplete=True)
    return CacheEntry(name, url, s.n_contexts, s.n_tokens, s.complete, disk_bytes(url), s.settings["model"]["name"],
                      s.hooks, s.settings["dataset"]["name"])  # fmt: skip


def list_entries(root: str) -> list[CacheEntry]:
    return [entry(root, name) for name in _entries(root) if store_exists(_join(root, "stores", name))]


@dataclass(frozen=True)
class Damage:
    """One damaged piece of a store: a chunk that fails its checksum, or a shard file that is gone."""

    array: str
    start: int
    stop: int
    shard: int
    reason: str

    def __str__(self) -> str:
        return f"{self.array} contexts [{self.start}, {self.stop}) ({self.reason})"


def find_damage(url: str) -> list[Damage]:
    """Check every committed chunk of every array: shard file present, checksum and decoding fine."""
    s = open_store(url, allow_incomplete=True)
    group = _open_group(url, "r")
    per = s.contexts_per_chunk * int(s.settings["chunks_per_shard"])
    damaged = []
    for name in ["tokens", *(f"{ACTS}/{h}" for h in s.hooks)]:
        arr = group[name]
        missing = set(s.missing_shards(name, 0, s.n_contexts))
        for start, stop in s.chunk_bounds():
            if start // per in missing:
                damaged.append(
                    Damage(
                        name,
                        start,
                        stop,
                        start // per,
                        f"shard file {s.shard_key(name, start // per)} missing",
                    )
                )
                continue
            try:
                block = arr[start:stop]
                if name != "tokens" and not np.isfinite(from_stored(block, s.dtype)).all():
                    damaged.append(Damage(name, start, stop, start // per, "non-finite values"))
            except Exception as e:  # checksum mismatch, undecodable bytes
                damaged.append(Damage(name, start, stop, start // per, type(e).__name__))
    return damaged


def verify(url: str) -> list[str]:
    """Read every committed chunk of every array; return the damaged pieces (empty: intact)."""
    return [str(d) for d in find_damage(url)]


def remove(root: str, name: str) -> str:
    url = _join(root, "stores", safe_name(name))
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise SaepipeError(f"no cached store named {name} under {root}; see `saepipe cache ls`")
    fs.rm(path, recursive=True)
    return url
