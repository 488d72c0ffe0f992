"""Writing a store (the contract is `saepipe.harvest.store`): create or resume with identical settings,
write whole shards, commit each with its statistics in one metadata write, and finish."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from saepipe.errors import SaepipeError
from saepipe.harvest.lease import Lease
from saepipe.harvest.store_format import (
    ACTS,
    FORMAT,
    STORED_DTYPES,
    Committed,
    _is_url,
    _open_group,
    from_stored,
    schema_version,
    shard_key,
    store_exists,
    to_stored,
)
from saepipe.harvest.store_reader import ActivationStore


class StoreWriter(Committed):
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
        self._write_rows(start, tokens, acts)

    def _write_rows(self, start: int, tokens: np.ndarray, acts: dict[str, np.ndarray]) -> None:
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
        self._write_rows(start, tokens, acts)

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
