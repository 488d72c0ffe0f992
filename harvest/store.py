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

Every name a caller needs is importable from here; the code lives in `store_format` (layout, dtypes, keys),
`store_reader` (`ActivationStore`, `open_store`) and `store_writer` (`StoreWriter`, commits, statistics).
"""

from saepipe.harvest.store_format import (
    ACTS,
    FORMAT,
    SCHEMA_VERSION,
    STORED_DTYPES,
    _is_url,
    _open_group,
    bfloat16_bits,
    disk_bytes,
    from_stored,
    n_contexts_for,
    schema_version,
    shard_key,
    store_exists,
    to_stored,
)
from saepipe.harvest.store_reader import ActivationStore, HookStats, open_store, store_complete
from saepipe.harvest.store_writer import StoreWriter, shard_stats

__all__ = [
    "ACTS",
    "FORMAT",
    "SCHEMA_VERSION",
    "STORED_DTYPES",
    "ActivationStore",
    "HookStats",
    "StoreWriter",
    "_is_url",
    "_open_group",
    "bfloat16_bits",
    "disk_bytes",
    "from_stored",
    "n_contexts_for",
    "open_store",
    "schema_version",
    "shard_key",
    "shard_stats",
    "store_complete",
    "store_exists",
    "to_stored",
]
