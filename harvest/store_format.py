"""The store's layout and value representation (documented in `saepipe.harvest.store`): names, schema
versions, the bfloat16 bit patterns, shard file keys, and opening the Zarr group on any fsspec backend."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr

FORMAT = "saepipe.activations"
SCHEMA_VERSION = 2
"""The newest schema this module reads; it writes version 1 unless the store needs 2 (`schema_version`)."""
ACTS = "activations"
STORED_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
"""Storage dtype name -> the Zarr data type that holds it (bfloat16: its bit patterns)."""


def schema_version(dtype: str) -> int:
    """Version 2 only adds the bfloat16 representation; other stores stay readable by older readers."""
    return 2 if dtype == "bfloat16" else 1


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values -> uint16 bfloat16 bit patterns, rounded to nearest even (as torch and CUDA round);
    NaN stays NaN, values past bfloat16's range become inf."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    bits[nan] = (u[nan] >> 16).astype(np.uint16) | 0x40  # quiet NaN, sign kept
    return bits


def from_stored(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Activations as read from a store of `dtype` -> float values (bfloat16 bits -> float32, exact)."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def to_stored(a: np.ndarray, dtype: str) -> np.ndarray:
    """Activations -> a store's representation: for bfloat16, uint16 bits pass as they are and float values
    are rounded (`bfloat16_bits`); float16/float32 stores take their values as given."""
    if dtype == "bfloat16" and a.dtype != np.uint16:
        return bfloat16_bits(a)
    return a


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _open_group(path: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    opts = {"storage_options": storage_options} if (storage_options and _is_url(path)) else {}
    return zarr.open_group(store=path, mode=mode, zarr_format=3, **opts)


def store_exists(path: str, storage_options: dict | None = None) -> bool:
    try:
        group = _open_group(path, "r", storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return False
    return "saepipe" in group.attrs


def shard_key(name: str, shard: int) -> str:
    """Path of an array's shard file inside the store (`c/<shard>/0[/0]`, zarr's default key encoding)."""
    return "/".join([name, "c", str(shard), *(["0"] * (1 if name == "tokens" else 2))])


def n_contexts_for(tokens: int, context_size: int) -> int:
    return max(1, math.ceil(tokens / context_size))


def disk_bytes(path: str, storage_options: dict | None = None) -> int:
    """Bytes the store occupies (local path or fsspec URL)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return int(sum(fs.du(root, total=False).values())) if fs.exists(root) else 0


class Committed:
    """What a store's metadata says is committed, for the reader and the writer alike (both hold the
    store's `meta` and `settings` dicts)."""

    meta: dict[str, Any]
    settings: dict[str, Any]

    @property
    def n_contexts(self) -> int:
        """Committed contexts (the only ones a reader may use)."""
        return int(self.meta["n_contexts"])

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def shard_contexts(self) -> int:
        """Contexts per shard file: the unit written, committed and repaired at once."""
        return int(self.settings["contexts_per_chunk"]) * int(self.settings["chunks_per_shard"])
