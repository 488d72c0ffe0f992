"""Reading a store (the contract is `saepipe.harvest.store`): metadata checked against the arrays on open,
and every read checked for missing shard files and failing checksums, so damage is a one-line error."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from saepipe.errors import SaepipeError
from saepipe.harvest.store_format import (
    ACTS,
    FORMAT,
    SCHEMA_VERSION,
    STORED_DTYPES,
    Committed,
    _open_group,
    from_stored,
    shard_key,
    store_exists,
)
from saepipe.harvest.store_settings import StoreSettings


@dataclass(frozen=True)
class HookStats:
    """Running statistics of one hook over committed non-BOS positions."""

    count: int
    mean: np.ndarray  # [d_model] float64
    mean_sq_norm: float


class ActivationStore(Committed):
    """Read access to a store: metadata, committed contexts, activations, statistics."""

    def __init__(self, path: str, storage_options: dict | None = None, allow_incomplete: bool = False):
        self.path = path
        try:
            self.group = _open_group(path, "r", storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise SaepipeError(
                f"no activation store at {path}; run `saepipe harvest --out {path}` first"
            ) from None
        except (ValueError, KeyError) as e:
            raise SaepipeError(
                f"{path} is not a readable Zarr v3 group ({e}); give a saepipe store"
            ) from None
        meta = dict(self.group.attrs).get("saepipe")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SaepipeError(
                f"{path} is a Zarr group but not a saepipe activation store (no saepipe metadata)"
            )
        version = meta.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise SaepipeError(
                f"store {path} has schema version {version}, newer than this saepipe reads ({SCHEMA_VERSION}); "
                "upgrade saepipe"
            )
        self.path = path
        self.meta: dict[str, Any] = meta
        self.settings: dict[str, Any] = meta.get("settings") or {}
        self.info = StoreSettings.from_dict(self.settings)
        """The settings as a typed view (`is_synthetic`, `model_fingerprint`, `first_position`, ...)."""
        self.storage_options = storage_options
        self._files: set[str] | None = None
        self._check_layout()
        if not meta.get("complete") and not allow_incomplete:
            raise SaepipeError(
                f"store {path} is incomplete ({meta['n_contexts']} of {self.settings['n_contexts_target']} "
                "contexts); rerun the same harvest command to finish it"
            )

    def _check_layout(self) -> None:
        """Refuse metadata that disagrees with the arrays (an edited or damaged zarr.json)."""
        s, n = self.settings, self.meta.get("n_contexts")
        try:
            expected = {"tokens": ((s["context_size"],), "int32")}
            expected.update(
                {
                    f"{ACTS}/{h}": ((s["context_size"], s["model"]["d_model"]), STORED_DTYPES[s["dtype"]])
                    for h in s["hooks"]
                }
            )
            target = int(s["n_contexts_target"])
        except (KeyError, TypeError, ValueError) as e:
            raise SaepipeError(
                f"store {self.path}: zarr.json metadata is damaged (settings lack or garble {e}); re-harvest"
            ) from None
        if not isinstance(n, int) or not 0 <= n <= target:
            raise SaepipeError(
                f"store {self.path}: zarr.json claims {n!r} committed contexts of {target}; re-harvest"
            )
        for name, (tail, dtype) in expected.items():
            try:
                arr = self.group[name]
            except (KeyError, ValueError, FileNotFoundError):
                raise SaepipeError(
                    f"store {self.path}: array {name} is missing or its zarr.json is damaged; re-harvest"
                ) from None
            if tuple(arr.shape[1:]) != tail or arr.shape[0] < n or str(arr.dtype) != dtype:
                raise SaepipeError(
                    f"store {self.path}: array {name} is {arr.dtype!s} {list(arr.shape)} but the metadata says "
                    f"{dtype} [>={n}, {', '.join(map(str, tail))}]; the store's zarr.json was edited or damaged; re-harvest"
                )

    @property
    def hooks(self) -> list[str]:
        return list(self.settings["hooks"])

    @property
    def d_model(self) -> int:
        return int(self.settings["model"]["d_model"])

    @property
    def context_size(self) -> int:
        return int(self.settings["context_size"])

    @property
    def contexts_per_chunk(self) -> int:
        return int(self.settings["contexts_per_chunk"])

    @property
    def n_tokens(self) -> int:
        return self.n_contexts * self.context_size

    @property
    def dtype(self) -> str:
        """Storage dtype: float16, float32 or bfloat16 (read back as float32)."""
        return str(self.settings["dtype"])

    @property
    def special_token_ids(self) -> list[int]:
        """The tokenizer's BOS and EOS ids as the store records them (none for a synthetic store)."""
        tok = self.settings.get("tokenizer") or {}
        return sorted({int(t) for t in (tok.get("bos_token_id"), tok.get("eos_token_id")) if t is not None})

    def refresh(self) -> None:
        """Re-read the metadata (to follow a store that is still being written)."""
        self.group = _open_group(self.path, "r", self.storage_options)
        self.meta = dict(self.group.attrs)["saepipe"]
        self._files = None

    def _array(self, hook: str) -> zarr.Array:
        if hook not in self.hooks:
            raise SaepipeError(f"store {self.path} has no hook {hook!r}; it holds: {', '.join(self.hooks)}")
        return self.group[f"{ACTS}/{hook}"]

    def _check(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.n_contexts:
            raise IndexError(f"contexts [{start}, {stop}) outside the committed [0, {self.n_contexts})")

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids [stop - start, context_size] int32."""
        stop = self.n_contexts if stop is None else stop
        self._check(start, stop)
        return self._read("tokens", start, stop)

    def activations(self, hook: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Activations [stop - start, context_size, d_model] in the store's dtype (float32 for bfloat16)."""
        stop = self.n_contexts if stop is None else stop
        self._check(start, stop)
        self._array(hook)
        return from_stored(self._read(f"{ACTS}/{hook}", start, stop), self.dtype)

    def shard_key(self, name: str, shard: int) -> str:
        return shard_key(name, shard)

    def missing_shards(self, name: str, start: int, stop: int) -> list[int]:
        """Shards of `name` over committed contexts [start, stop) whose file is absent: zarr would silently
        read them as zeros (its fill value), so every read checks first."""
        if self._files is None:
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.path, **(self.storage_options or {}))
            root = root.rstrip("/")
            self._files = {p[len(root) + 1 :] for p in fs.find(root)}
        per = self.shard_contexts
        shards = range(start // per, -(-stop // per)) if stop > start else range(0)
        return [i for i in shards if self.shard_key(name, i) not in self._files]

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array `name`, or a one-line error naming the damaged shard file."""
        fix = "repair it with the same `saepipe harvest` command plus --repair"
        per = self.shard_contexts
        if missing := self.missing_shards(name, start, stop):
            i = missing[0]
            raise SaepipeError(
                f"store {self.path}: shard file {self.shard_key(name, i)} (contexts [{i * per}, "
                f"{min((i + 1) * per, self.n_contexts)})) is missing; {fix}"
            )
        try:
            return self.group[name][start:stop]
        except Exception:  # zarr surfaces checksum and decode failures under several types
            c = self.contexts_per_chunk
            for a in range(start - start % c, stop, c):  # name the first damaged chunk
                try:
                    self.group[name][a : min(a + c, stop)]
                except Exception as e:
                    raise SaepipeError(
                        f"store {self.path}: chunk {name} contexts [{a}, {min(a + c, self.n_contexts)}) in shard "
                        f"file {self.shard_key(name, a // per)} is damaged ({e}); {fix}"
                    ) from None
            raise

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) context ranges of the committed chunks, the unit a loader reads and shuffles."""
        c = self.contexts_per_chunk
        return [(s, min(s + c, self.n_contexts)) for s in range(0, self.n_contexts, c)]

    def stats(self, hook: str) -> HookStats:
        self._array(hook)
        s = self.meta["stats"][hook]
        return HookStats(int(s["count"]), np.asarray(s["mean"], dtype=np.float64), float(s["mean_sq_norm"]))

    def iter_token_rows(
        self, hook: str, drop_bos: bool = True, drop_tokens: Iterable[int] = ()
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Chunk by chunk in order: (activations [n, d_model], addresses [n, 2] = (context, position)),
        without position 0 when it holds a prepended BOS and without positions holding `drop_tokens`."""
        skip_bos = drop_bos and bool(self.settings["prepend_bos"])
        first = 1 if skip_bos else 0
        T = self.context_size
        drop = np.asarray(sorted(set(drop_tokens)), dtype=np.int64)
        for start, stop in self.chunk_bounds():
            acts = self.activations(hook, start, stop)[:, first:]
            ctx, pos = np.meshgrid(np.arange(start, stop), np.arange(first, T), indexing="ij")
            rows, addr = acts.reshape(-1, acts.shape[-1]), np.stack([ctx.ravel(), pos.ravel()], axis=1)
            if len(drop):
                keep = ~np.isin(self.tokens(start, stop)[:, first:].ravel(), drop)
                rows, addr = rows[keep], addr[keep]
            yield rows, addr


def open_store(
    path: str, storage_options: dict | None = None, allow_incomplete: bool = False
) -> ActivationStore:
    """Open a store for reading; refuses an incomplete store unless `allow_incomplete`."""
    return ActivationStore(path, storage_options, allow_incomplete)


def store_complete(path: str, storage_options: dict | None = None) -> bool:
    """Whether a store exists at `path` and holds every context it was made for."""
    return (
        store_exists(path, storage_options)
        and open_store(path, storage_options, allow_incomplete=True).complete
    )
