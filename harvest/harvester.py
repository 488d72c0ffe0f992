"""The harvest loop: packed contexts -> truncated forward with hooks -> whole shards -> commit.

Batches always start at a shard boundary, so a resumed run feeds the model exactly the batches an
uninterrupted run would, and the finished store is byte-identical.
"""

from __future__ import annotations

import errno
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from saepipe.errors import SaepipeError
from saepipe.harvest import hooks as hooklib
from saepipe.harvest.cache import cache_root, locate
from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.corpus import iter_texts, pack_contexts
from saepipe.harvest.lease import Lease, LeaseHeld
from saepipe.harvest.models import LoadedModel, load_model
from saepipe.harvest.store import StoreWriter, _is_url, n_contexts_for, open_store, store_exists


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
    if _is_url(out):
        return
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise SaepipeError(f"--out {out} is an existing file; give a directory path for the store")
    if path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").exists():
        raise SaepipeError(f"--out {out} is a non-empty directory that is not a store; choose a new path")
    parent = path if path.exists() else next(p for p in path.parents if p.exists())
    try:  # try it for real: os.access says yes to root even where nothing can be written
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".saepipe-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SaepipeError(
            f"--out {out}: cannot write in {parent} ({e.strerror}); choose a writable path"
        ) from None


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
            "name": str(getattr(tok, "name_or_path", "")),
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        "dataset": {
            "name": cfg.dataset,
            "config": cfg.dataset_config,
            "split": cfg.split,
            "text_column": cfg.text_column,
        },
        "hooks": list(cfg.hooks),
        "context_size": cfg.context_size,
        "prepend_bos": cfg.prepend_bos,
        "dtype": cfg.dtype,
        "compression": cfg.compression,
        "contexts_per_chunk": cfg.contexts_per_chunk,
        "chunks_per_shard": cfg.chunks_per_shard,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "n_contexts_target": n_contexts_for(cfg.tokens, cfg.context_size),
    }


def _to_storage(x: torch.Tensor, dtype: str, hook: str, ctx0: int) -> np.ndarray:
    if not torch.isfinite(x).all():
        bad = int(torch.nonzero(~torch.isfinite(x).flatten(1).all(1))[0])
        raise SaepipeError(
            f"the model produced NaN/inf at hook {hook} in context {ctx0 + bad}; check the model weights"
        )
    y = x.to(torch.float16 if dtype == "float16" else torch.float32)
    if not torch.isfinite(y).all():
        bad = int(torch.nonzero(~torch.isfinite(y).flatten(1).all(1))[0])
        raise SaepipeError(
            f"activations at hook {hook} in context {ctx0 + bad} overflow {dtype}; rerun with --dtype float32 "
            "into a new --out"
        )
    return y.cpu().numpy()


@torch.inference_mode()
def run_shard(
    model: LoadedModel,
    resolved: dict[str, str],
    stop: int | None,
    tokens: np.ndarray,
    cfg: HarvestConfig,
    ctx0: int,
) -> dict[str, np.ndarray]:
    """Activations of every hook for one shard's contexts, computed batch by batch from its start."""
    device = next(model.bridge.original_model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {h: [] for h in resolved}
    with hooklib.recording(model.bridge, resolved) as acts:
        for b in range(0, len(tokens), cfg.batch_size):
            batch = torch.from_numpy(tokens[b : b + cfg.batch_size]).long().to(device)
            model.bridge(batch, return_type=None, stop_at_layer=stop)
            for h in resolved:
                parts[h].append(_to_storage(acts[h], cfg.dtype, h, ctx0 + b))
    return {h: np.concatenate(p) for h, p in parts.items()}


def harvest(cfg: HarvestConfig, progress: bool = True) -> HarvestResult:
    """Harvest `cfg.tokens` tokens into `cfg.out` (or the cache), resuming a store with the same settings.

    One writer per store: a lease beside it (`<store>.lock`) makes a second harvester of the same store
    wait for the first and then use its result.
    """
    if cfg.out is not None:
        check_writable(cfg.out)
    model = load_model(cfg.model, cfg.device, cfg.model_dtype)
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
    said = False
    while True:
        try:
            with Lease(out + ".lock", cfg.lock_stale_after):
                return _write(out, settings, cfg, model, resolved, progress)
        except LeaseHeld as held:
            if not said:
                print(f"another harvester ({held}) is writing {out}; waiting for it", file=sys.stderr)
                said = True
            if store_exists(out) and open_store(out, allow_incomplete=True).complete:
                StoreWriter(out, settings)  # refuses a store with other settings, like any rerun
                n = open_store(out).n_contexts
                return HarvestResult(out, n, n * cfg.context_size, 0, 0.0, True)
            time.sleep(1.0)


def _write(
    out: str, settings: dict, cfg: HarvestConfig, model: LoadedModel, resolved: dict[str, str], progress: bool
) -> HarvestResult:
    """The harvest proper, under the store's lease."""
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
    contexts = itertools.chain([first], contexts)

    writer = StoreWriter(out, settings)
    T = cfg.context_size
    stop = hooklib.stop_layer(cfg.hooks, model.n_layers)
    repaired = _repair(out, writer, cfg, model, resolved, stop) if cfg.repair else 0
    if writer.complete:
        return HarvestResult(out, writer.n_contexts, writer.n_contexts * T, 0, 0.0, not repaired, repaired)
    target = writer.settings["n_contexts_target"]
    done0 = writer.n_contexts
    t_loop = time.perf_counter()
    contexts = itertools.islice(contexts, done0, target)  # skip what is committed (packing is deterministic)
    bar = tqdm(
        total=target * T, initial=done0 * T, unit="tok", unit_scale=True, desc="harvest", disable=not progress
    )
    first_pos = 1 if cfg.prepend_bos else 0
    while writer.n_contexts < target:
        start = writer.n_contexts
        rows = list(itertools.islice(contexts, min(writer.shard_contexts, target - start)))
        if not rows:
            break  # the dataset ran out before the target
        tokens = np.stack(rows)
        acts = run_shard(model, resolved, stop, tokens, cfg, start)
        try:
            writer.write_shard(start, tokens, acts, first_pos)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise SaepipeError(
                f"store {out}: {e.strerror} while writing contexts [{start}, {start + len(rows)}) "
                f"({writer.n_contexts} of {target} committed and intact); free space, then rerun the same command "
                "to resume"
            ) from None
        bar.update(len(rows) * T)
    bar.close()
    writer.finish()
    n = writer.n_contexts
    return HarvestResult(out, n, n * T, (n - done0) * T, time.perf_counter() - t_loop, False, repaired)


def _repair(
    out: str,
    writer: StoreWriter,
    cfg: HarvestConfig,
    model: LoadedModel,
    resolved: dict[str, str],
    stop: int | None,
) -> int:
    """Recompute the committed shards that hold damage; batches start at shard boundaries as in the first
    run, so the repaired shard files are byte-identical to undamaged ones."""
    from saepipe.harvest.cache import find_damage

    shards = sorted({d.shard for d in find_damage(out)})
    if not shards:
        return 0
    contexts = pack_contexts(
        iter_texts(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column),
        model.tokenizer,
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
        tokens = np.stack(rows)
        writer.rewrite_shard(shard, tokens, run_shard(model, resolved, stop, tokens, cfg, start))
    if left := find_damage(out):
        raise SaepipeError(
            f"store {out} is still damaged after --repair ({left[0]}); re-harvest into a new --out"
        )
    return len(shards)
