"""The harvest loop: packed contexts -> truncated forward with hooks -> whole shards -> commit.

Three things run at once so that the forward never waits for the store (issue 18): contexts are packed a
shard or two ahead in one thread (`overlap.ahead`), the model runs in the calling thread (`capture`), and
each shard is checked, written and committed in a writer thread while the next shard's forward runs
(`overlap.Behind`, one shard in flight). Batches always start at a shard boundary, so a resumed run feeds
the model exactly the batches an uninterrupted run would, and the finished store is byte-identical.

This module is the one-process harvest; several processes under a launcher share the same pieces in
`ranks.write_ranked`, which adds who computes which shard and how rank 0 commits them.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from saepipe.errors import SaepipeError
from saepipe.files import check_out_dir
from saepipe.harvest import hooks as hooklib
from saepipe.harvest.cache import cache_root, locate
from saepipe.harvest.capture import Capture, Shard
from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.corpus import dataset_fingerprint, iter_texts, pack_contexts, shard_tokens
from saepipe.harvest.devices import RankInfo, rank_device, rank_info
from saepipe.harvest.lease import Lease, LeaseHeld
from saepipe.harvest.models import LoadedModel, load_model
from saepipe.harvest.overlap import Behind, ahead
from saepipe.harvest.ranks import write_ranked
from saepipe.harvest.store import (
    StoreWriter,
    _is_url,
    n_contexts_for,
    open_store,
    store_complete,
    store_exists,
)


@dataclass(frozen=True)
class HarvestResult:
    path: str
    n_contexts: int
    n_tokens: int
    """Tokens committed in the store (including BOS positions)."""
    tokens_written_now: int
    seconds: float
    """Seconds spent harvesting (model loading excluded)."""
    already_complete: bool
    repaired_shards: int = 0
    """Shards recomputed by --repair."""


def check_writable(out: str) -> None:
    """Refuse an unusable --out before spending minutes loading a model."""
    if not _is_url(out):
        check_out_dir(out, "give a directory path for the store", _not_a_store)


def _not_a_store(path: Path) -> str | None:
    return "is not a store" if any(path.iterdir()) and not (path / "zarr.json").exists() else None


def store_settings(cfg: HarvestConfig, model: LoadedModel) -> dict:
    """Everything that determines a store's bytes; a resume must match it exactly."""
    tok = model.tokenizer
    return {
        "model": {
            "name": cfg.model,
            "fingerprint": model.fingerprint,
            "d_model": model.d_model,
            "n_layers": model.n_layers,
            "dtype": cfg.model_dtype,
        },
        "tokenizer": {
            # --model's tokenizer, by that name: a packaged or .gguf model's local conversion has a path that
            # differs between installs, which would give one store as many cache keys
            "name": cfg.model,
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        "dataset": {
            "name": cfg.dataset,
            "config": cfg.dataset_config,
            "split": cfg.split,
            "text_column": cfg.text_column,
            "fingerprint": dataset_fingerprint(cfg.dataset),  # the text itself, so the cache key sees edits
        },
        "hooks": list(cfg.hooks),
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "dtype": cfg.dtype,
        "compression": cfg.compression,
        "contexts_per_chunk": cfg.contexts_per_chunk,
        "chunks_per_shard": cfg.chunks_per_shard,
        "batch_size": cfg.batch_size,
        "n_contexts_target": n_contexts_for(cfg.tokens, cfg.context_size),
    }


def harvest(cfg: HarvestConfig, progress: bool = True) -> HarvestResult:
    """Harvest `cfg.tokens` tokens into `cfg.out` (or the cache), resuming a store with the same settings.

    One writer per store: a lease beside it (`<store>.lock`) makes a second harvester of the same store
    wait for the first and then use its result.
    """
    if cfg.out is not None:
        check_writable(cfg.out)
    ranks = rank_info()
    model = load_model(cfg.model, rank_device(cfg.device, ranks), cfg.model_dtype)
    resolved = hooklib.resolve_hooks(model.bridge, cfg.hooks)
    if cfg.context_size > model.n_ctx:
        raise SaepipeError(
            f"--context-size {cfg.context_size} exceeds the model's maximum of {model.n_ctx}; lower it"
        )
    settings = store_settings(cfg, model)
    out = cfg.out if cfg.out is not None else locate(cache_root(cfg.cache), settings)
    if cfg.repair and not store_exists(out):
        raise SaepipeError(
            f"--repair: no store at {out} to repair; give the --out (or cache) of an existing store"
        )
    if (
        cfg.out is None
        and not cfg.repair
        and store_exists(out)
        and (found := open_store(out, allow_incomplete=True)).complete
    ):
        return HarvestResult(out, found.n_contexts, found.n_tokens, 0, 0.0, True)  # a cached store serves it
    check_writable(out)
    if ranks.world > 1 and cfg.repair:
        raise SaepipeError("--repair runs in one process; rerun it without the launcher")
    if ranks.rank > 0:
        return _write(out, settings, cfg, model, resolved, False, ranks)  # rank 0 holds the lease
    said = False
    while True:
        try:
            with Lease(out + ".lock", cfg.lock_stale_after) as lease:
                return _write(out, settings, cfg, model, resolved, progress, ranks, lease)
        except LeaseHeld as held:
            if not said:
                print(f"another harvester ({held}) is writing {out}; waiting for it", file=sys.stderr)
                said = True
            if store_complete(out):
                StoreWriter(out, settings)  # refuses a store with other settings, like any rerun
                n = open_store(out).n_contexts
                return HarvestResult(out, n, n * cfg.context_size, 0, 0.0, True)
            time.sleep(1.0)


def _write(
    out: str,
    settings: dict,
    cfg: HarvestConfig,
    model: LoadedModel,
    resolved: dict[str, str],
    progress: bool,
    ranks: RankInfo,
    lease: Lease | None = None,
) -> HarvestResult:
    """The harvest proper: packed contexts, then one process's loop or this rank's part of several."""
    contexts = _contexts(cfg, model)  # refuses a dataset too small for one context before making a store
    capture = Capture(model, resolved, hooklib.stop_layer(cfg.hooks, model.n_layers), cfg)
    if ranks.world > 1:
        run = write_ranked(out, settings, cfg, capture, contexts, progress, ranks, lease)
        T = cfg.context_size
        n = run.n_contexts
        return HarvestResult(out, n, n * T, run.written * T, run.seconds, run.already_complete)
    return _one_process(out, settings, cfg, capture, contexts, progress, lease)


def _contexts(cfg: HarvestConfig, model: LoadedModel) -> Iterator[np.ndarray]:
    """The packed contexts of the dataset from context 0; refuses a dataset without one whole context."""
    contexts = pack_contexts(
        iter_texts(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column),
        model.tokenizer,
        cfg.context_size,
        cfg.prepend_bos,
    )
    first = next(contexts, None)
    if first is None:
        raise SaepipeError(
            f"--dataset {cfg.dataset} holds less text than one context of {cfg.context_size} tokens"
        )
    return itertools.chain([first], contexts)


def _one_process(
    out: str,
    settings: dict,
    cfg: HarvestConfig,
    capture: Capture,
    contexts: Iterator[np.ndarray],
    progress: bool,
    lease: Lease | None,
) -> HarvestResult:
    """Shards in order from the commit point; each is written and committed behind the next one's forward."""
    writer = StoreWriter(out, settings, lease=lease)
    T = cfg.context_size
    repaired = _repair(out, writer, cfg, capture) if cfg.repair else 0
    if writer.complete:
        return HarvestResult(out, writer.n_contexts, writer.n_contexts * T, 0, 0.0, not repaired, repaired)
    target, per, done0 = writer.settings["n_contexts_target"], writer.shard_contexts, writer.n_contexts
    first_pos = 1 if cfg.prepend_bos else 0
    bar = tqdm(
        total=target * T, initial=done0 * T, unit="tok", unit_scale=True, desc="harvest", disable=not progress
    )

    def write(shard: Shard) -> None:  # in the writer thread
        try:
            acts = shard.arrays(cfg.dtype)  # refuses NaN/inf and overflow
            with writer.out_of_space(shard.start, len(shard.tokens)):
                writer.write_shard(shard.start, shard.tokens, acts, first_pos)  # data, then the commit
        finally:
            shard.done()
        bar.update(len(shard.tokens) * T)

    t0 = time.perf_counter()
    packed = ahead(shard_tokens(contexts, range(done0 // per, -(-target // per)), per, target))
    with contextlib.closing(packed), Behind() as behind:
        for part in packed:
            if len(part.tokens):
                behind.submit(write, capture.run(part.start, part.tokens))
    bar.close()
    writer.finish()
    n = writer.n_contexts
    return HarvestResult(out, n, n * T, (n - done0) * T, time.perf_counter() - t0, False, repaired)


def _repair(out: str, writer: StoreWriter, cfg: HarvestConfig, capture: Capture) -> int:
    """Recompute the committed shards that hold damage; batches start at shard boundaries as in the first
    run, so the repaired shard files are byte-identical to undamaged ones."""
    from saepipe.harvest.cache import find_damage

    shards = sorted({d.shard for d in find_damage(out)})
    if not shards:
        return 0
    contexts = pack_contexts(
        iter_texts(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column),
        capture.model.tokenizer,
        cfg.context_size,
        cfg.prepend_bos,
    )
    per, done = writer.shard_contexts, 0
    for shard in shards:
        start, end = shard * per, min((shard + 1) * per, writer.n_contexts)
        rows = list(itertools.islice(contexts, start - done, end - done))
        done = end
        if len(rows) != end - start:
            raise SaepipeError(
                f"--repair: --dataset {cfg.dataset} no longer yields the store's contexts; re-harvest"
            )
        computed = capture.run(start, np.stack(rows))
        try:
            writer.rewrite_shard(shard, computed.tokens, computed.arrays(cfg.dtype))
        finally:
            computed.done()
    if left := find_damage(out):
        raise SaepipeError(
            f"store {out} is still damaged after --repair ({left[0]}); re-harvest into a new --out"
        )
    return len(shards)
