"""The activation store: a Zarr v3 group that every later stage reads. This module is its contract.

Layout (format `saepipe.activations`, schema version 1, or 2 for bfloat16 stores; see harvest/README.md for a
reader without saepipe):

    zarr.json                      group; attributes["saepipe"] holds the metadata below
    tokens                         int32  [n_contexts_target, context_size]
    activations/<hook name>        dtype  [n_contexts_target, context_size, d_model], one array per hook

`dtype` is float16 or float32, stored natively. Zarr v3 has no bfloat16 data type, so a `bfloat16` store
keeps each value's bit pattern in a uint16 array (the high 16 bits of the float32 with the same value; the
array's attributes say `{"saepipe": {"dtype": "bfloat16"}}`) and is written with schema version 2, so that
an older saepipe refuses it ("upgrade saepipe") instead of misreading it; float16 and float32 stores keep
version 1. Readers get bfloat16 activations as float32 (exact), through `ActivationStore.activations`.

Every array is chunked along contexts only (`contexts_per_chunk` contexts a chunk) and stored with the
sharding codec (`chunks_per_shard` chunks a shard file); each chunk carries a crc32c checksum so a flipped
byte is caught on read. Row i of `tokens` and of every activation array is the same context, so every
activation has its address (context, position) on one grid.

Metadata (`attributes["saepipe"]`): `format`, `schema_version`, `settings` (everything that determines the
bytes: model name/fingerprint/d_model/n_layers/dtype, tokenizer, dataset with its fingerprint, hooks,
context_size, prepend_bos, dtype, chunking, n_contexts_target; synthetic stores add their seed), and progress: `n_contexts` (how many leading
contexts are committed; readers trust only this prefix), `complete`, `stats` per hook over committed
non-BOS positions (`count`, `mean` [d_model], `mean_sq_norm`), and, once complete, `norms` per hook: the
norm distribution and its outlier positions, tokens and dimensions (saepipe.harvest.norms documents it).

Later stages read `settings` through `ActivationStore.info`, a typed view (saepipe.harvest.store_settings).

Writes are whole shards, each followed by a metadata commit, so a killed writer leaves a store that claims
no more than it holds and resumes at the first uncommitted shard.

Reads trust nothing silently: opening checks the metadata against the arrays (shape, dtype, commit count),
every read checks that the shard files it needs exist (zarr alone reads a missing shard as zeros, its fill
value) and names the first chunk whose checksum fails. `saepipe cache verify` checks every chunk;
`saepipe harvest ... --repair` recomputes only the damaged shards, byte-identical to the originals.
"""

from __future__ import annotations

import contextlib
import errno
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from saepipe.errors import SaepipeError
from saepipe.harvest.lease import Lease
from saepipe.harvest.store_settings import StoreSettings

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


@dataclass(frozen=True)
class HookStats:
    """Running statistics of one hook over committed non-BOS positions."""

    count: int
    mean: np.ndarray  # [d_model] float64
    mean_sq_norm: float


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


class ActivationStore:
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
    def n_contexts(self) -> int:
        """Committed contexts (the only ones a reader may use)."""
        return int(self.meta["n_contexts"])

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

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
        per = self.contexts_per_chunk * int(self.settings["chunks_per_shard"])
        shards = range(start // per, -(-stop // per)) if stop > start else range(0)
        return [i for i in shards if self.shard_key(name, i) not in self._files]

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array `name`, or a one-line error naming the damaged shard file."""
        fix = "repair it with the same `saepipe harvest` command plus --repair"
        per = self.contexts_per_chunk * int(self.settings["chunks_per_shard"])
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


def shard_key(name: str, shard: int) -> str:
    """Path of an array's shard file inside the store (`c/<shard>/0[/0]`, zarr's default key encoding)."""
    return "/".join([name, "c", str(shard), *(["0"] * (1 if name == "tokens" else 2))])


def open_store(
    path: str, storage_options: dict | None = None, allow_incomplete: bool = False
) -> ActivationStore:
    """Open a store for reading; refuses an incomplete store unless `allow_incomplete`."""
    return ActivationStore(path, storage_options, allow_incomplete)


class StoreWriter:
    """Creates a store or resumes one with identical settings; writes and commits whole shards."""

    def __init__(
        self,
        path: str,
        settings: dict[str, Any],
        storage_options: dict | None = None,
        owner: bool = True,
        lease: Lease | None = None,
    ):
        """`owner=False` (the non-zero ranks of a multi-process harvest) only opens an existing store.
        With a `lease`, every write and commit first checks it is still held (`LeaseLost` otherwise)."""
        self.path = path
        self.settings = settings
        self.storage_options = storage_options
        self.lease = lease
        if store_exists(path, storage_options):
            self.group = _open_group(path, "r+", storage_options)
            meta = dict(self.group.attrs)["saepipe"]
            version = schema_version(settings["dtype"])
            if meta.get("schema_version") != version:
                raise SaepipeError(
                    f"store {path} has schema version {meta.get('schema_version')}; this saepipe writes "
                    f"{version}; harvest into a new --out"
                )
            _refuse_different(path, meta["settings"], settings)
            self.meta = meta
            if owner:
                _remove_partials(path)
        else:
            self.group = _open_group(path, "w", storage_options)
            self.meta = self._create()

    @property
    def n_contexts(self) -> int:
        return int(self.meta["n_contexts"])

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def shard_contexts(self) -> int:
        return self.settings["contexts_per_chunk"] * self.settings["chunks_per_shard"]

    def _create(self) -> dict[str, Any]:
        s = self.settings
        n, T, D = s["n_contexts_target"], s["context_size"], s["model"]["d_model"]
        c, shard = s["contexts_per_chunk"], self.shard_contexts
        compressors: list[Any] = [ZstdCodec(level=3)] if s["compression"] == "zstd" else []
        compressors.append(Crc32cCodec())  # per-chunk checksum: corruption is an error, never data
        common = {"compressors": compressors, "fill_value": 0, "overwrite": True}
        self.group.create_array(
            "tokens", shape=(n, T), chunks=(c, T), shards=(shard, T), dtype="int32", **common
        )
        acts = self.group.create_group(ACTS)
        # Only bfloat16 arrays carry attributes, so float16/float32 stores keep their version-1 bytes.
        attrs = {"attributes": {"saepipe": {"dtype": "bfloat16"}}} if s["dtype"] == "bfloat16" else {}
        for hook in s["hooks"]:
            acts.create_array(
                hook, shape=(n, T, D), chunks=(c, T, D), shards=(shard, T, D), dtype=STORED_DTYPES[s["dtype"]],
                **common, **attrs,
            )  # fmt: skip
        zero = {"count": 0, "mean": [0.0] * D, "mean_sq_norm": 0.0}
        meta = {
            "format": FORMAT,
            "schema_version": schema_version(s["dtype"]),
            "settings": s,
            "n_contexts": 0,
            "complete": False,
            "stats": {h: dict(zero) for h in s["hooks"]},
        }
        self.group.update_attributes({"saepipe": meta})
        return meta

    def _check_lease(self) -> None:
        """Stop (one line) before touching the store if another writer has taken the lease over."""
        if self.lease is not None:
            self.lease.check()

    def write_shard(
        self, start: int, tokens: np.ndarray, acts: dict[str, np.ndarray], first_pos: int
    ) -> None:
        """Write contexts [start, start + len(tokens)) and commit them with updated statistics.

        `start` must be the committed count (shards are written in order); `first_pos` is the first
        position counted in the statistics (1 when position 0 is BOS). `acts` as for `write_data`.
        """
        if start != self.n_contexts or start % self.shard_contexts:
            raise ValueError(f"shard start {start} is not the commit point {self.n_contexts}")
        acts = {h: to_stored(a, self.settings["dtype"]) for h, a in acts.items()}
        self.write_data(start, tokens, acts)
        self.commit(len(tokens), shard_stats(acts, first_pos, self.settings["dtype"]))

    def write_data(self, start: int, tokens: np.ndarray, acts: dict[str, np.ndarray]) -> None:
        """Write one shard's arrays without committing them (a multi-process harvest commits later).

        `acts` {hook: [n, context_size, d_model]} in the store's dtype; a bfloat16 store takes uint16 bits
        or float values (rounded to nearest even, see `to_stored`)."""
        if start % self.shard_contexts:
            raise ValueError(f"shard start {start} is not on the shard grid")
        self._check_lease()
        stop = start + len(tokens)
        # Every shard gets its file, even one equal to the fill value (zarr skips those by default): a
        # missing shard file is how readers recognise damage.
        with zarr.config.set({"array.write_empty_chunks": True}):
            self.group["tokens"][start:stop] = tokens
            for hook, a in acts.items():
                self.group[f"{ACTS}/{hook}"][start:stop] = to_stored(a, self.settings["dtype"])

    @contextlib.contextmanager
    def out_of_space(self, start: int, n_rows: int) -> Iterator[None]:
        """Turn a full disk (or quota) while writing contexts [start, start + n_rows) into a one-line error
        that says the committed contexts are intact and how to resume."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise SaepipeError(
                f"store {self.path}: {e.strerror} while writing contexts [{start}, {start + n_rows}) "
                f"({self.n_contexts} of {self.settings['n_contexts_target']} committed and intact); free space, "
                "then rerun the same command to resume"
            ) from None

    def commit(self, n_rows: int, stats: dict[str, dict]) -> None:
        """Commit the next `n_rows` contexts (already written) with their shard statistics."""
        self._check_lease()
        for hook, part in stats.items():
            self.meta["stats"][hook] = _merge_stats(self.meta["stats"][hook], part)
        self.meta["n_contexts"] += n_rows
        self.group.update_attributes({"saepipe": self.meta})  # the commit: written last, atomically

    def rewrite_shard(self, shard: int, tokens: np.ndarray, acts: dict[str, np.ndarray]) -> None:
        """Replace committed shard `shard` of every array with recomputed contexts (`--repair`); the
        metadata and statistics stay as committed, since they were computed from the original bytes."""
        import fsspec

        start = shard * self.shard_contexts
        if start + len(tokens) > self.n_contexts:
            raise ValueError(f"shard {shard} is not committed")
        self._check_lease()
        fs, root = fsspec.core.url_to_fs(self.path)
        for name in ["tokens", *(f"{ACTS}/{h}" for h in acts)]:
            key = f"{root.rstrip('/')}/{shard_key(name, shard)}"
            if fs.exists(key):
                fs.rm(key)  # zarr would read a damaged shard back to merge into it
        stop = start + len(tokens)
        # Every shard gets its file, even one equal to the fill value (zarr skips those by default): a
        # missing shard file is how readers recognise damage.
        with zarr.config.set({"array.write_empty_chunks": True}):
            self.group["tokens"][start:stop] = tokens
            for hook, a in acts.items():
                self.group[f"{ACTS}/{hook}"][start:stop] = to_stored(a, self.settings["dtype"])

    def finish(self) -> None:
        """Shrink the arrays to what was committed (the dataset may run out early), record the norm
        statistics from one pass over the committed bytes, and mark complete (one metadata write)."""
        from saepipe.harvest.norms import compute_norm_stats

        self._check_lease()
        n = self.n_contexts
        if n != self.settings["n_contexts_target"]:
            self.group["tokens"].resize((n, self.settings["context_size"]))
            for hook in self.settings["hooks"]:
                arr = self.group[f"{ACTS}/{hook}"]
                arr.resize((n, *arr.shape[1:]))
        reader = ActivationStore(self.path, self.storage_options, allow_incomplete=True)
        self.meta["norms"] = {hook: compute_norm_stats(reader, hook) for hook in self.settings["hooks"]}
        self._check_lease()  # the pass takes a while: still ours before the one metadata write
        self.meta["complete"] = True
        self.group.update_attributes({"saepipe": self.meta})


def _remove_partials(path: str) -> None:
    """Drop temp files a killed local write left behind (zarr writes `*.partial`, then renames)."""
    if not _is_url(path):
        for p in Path(path).rglob("*.partial"):
            p.unlink(missing_ok=True)


def shard_stats(
    acts: dict[str, np.ndarray], first_pos: int, dtype: str, block_rows: int = 1024
) -> dict[str, dict]:
    """Per hook: count, float64 sum vector and sum of squared norms of one shard (BOS excluded); `acts` in
    the representation of a `dtype` store.

    Statistics are always folded in shard by shard from these partial sums, so a store committed by one
    process and one committed from several processes' shards carry the same bytes. Summed in float64 over
    blocks of `block_rows` rows in a fixed order (deterministic, and ~2x faster than one float64 copy of
    the whole shard, which the harvest's writer thread would otherwise spend its time allocating)."""
    out = {}
    for hook, a in acts.items():
        x = a[:, first_pos:].reshape(-1, a.shape[-1])
        total, sum_sq = np.zeros(x.shape[1], dtype=np.float64), 0.0
        for i in range(0, len(x), block_rows):
            b = from_stored(x[i : i + block_rows], dtype).astype(np.float64)
            total += b.sum(axis=0)
            sum_sq += float(np.einsum("ij,ij->", b, b))
        out[hook] = {"count": x.shape[0], "sum": total.tolist(), "sum_sq": sum_sq}
    return out


def _merge_stats(old: dict, part: dict) -> dict:
    """Fold one shard's partial sums into the running float64 mean and mean squared norm."""
    n_old, n_new = int(old["count"]), int(part["count"])
    total = n_old + n_new
    if n_new == 0:
        return old
    mean = np.asarray(old["mean"], dtype=np.float64)
    mean = mean + (np.asarray(part["sum"], dtype=np.float64) - n_new * mean) / total
    msq = old["mean_sq_norm"] + (part["sum_sq"] - n_new * old["mean_sq_norm"]) / total
    return {"count": total, "mean": mean.tolist(), "mean_sq_norm": msq}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _refuse_different(path: str, have: dict, want: dict) -> None:
    have, want = _flat(have), _flat(want)
    fp = "dataset.fingerprint"
    if want.get(fp) is not None and have.get(fp) != want.get(fp):
        name = want.get("dataset.name")
        if fp not in have:  # written before stores recorded it (issue 16); reading it still works
            raise SaepipeError(
                f"store {path} was written before saepipe recorded dataset fingerprints, so whether dataset "
                f"{name} changed since cannot be checked; it still reads as before, but harvest will not resume, "
                "repair or reuse it: harvest into a new --out"
            )
        raise SaepipeError(
            f"store {path} was harvested from other text than dataset {name} holds now (fingerprint "
            f"{_short(have.get(fp))}, now {_short(want.get(fp))}); harvest into a new --out, or restore the "
            "dataset's files to resume it"
        )
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            raise SaepipeError(
                f"store {path} was harvested with {key}={_short(have.get(key))}, not {_short(want.get(key))}; "
                "rerun with the store's settings to resume it, or choose a new --out"
            )


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def n_contexts_for(tokens: int, context_size: int) -> int:
    return max(1, math.ceil(tokens / context_size))


def disk_bytes(path: str, storage_options: dict | None = None) -> int:
    """Bytes the store occupies (local path or fsspec URL)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return int(sum(fs.du(root, total=False).values())) if fs.exists(root) else 0
