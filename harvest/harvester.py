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
from saepipe.harvest.corpus import dataset_fingerprint, iter_texts, pack_contexts
from saepipe.harvest.lease import Lease, LeaseHeld
from saepipe.harvest.models import LoadedModel, load_model
from saepipe.harvest.ranks import Markers, RankInfo, rank_info, shards_for_rank
from saepipe.harvest.store import StoreWriter, _is_url, n_contexts_for, open_store, shard_stats, store_exists


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
    probe_writable(out, path if path.exists() else next(p for p in path.absolute().parents if p.exists()))


def probe_writable(out: str | Path, parent: Path) -> None:
    """Refuse `--out` unless a file can really be created in `parent` (os.access says yes to root even
    where nothing can be written)."""
    try:
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
    ranks = rank_info()
    device = cfg.device
    if ranks.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{ranks.local_rank}"  # one GPU per rank
    model = load_model(cfg.model, device, cfg.model_dtype)
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
            if store_exists(out) and open_store(out, allow_incomplete=True).complete:
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
    """The harvest proper: this rank's shards in order; rank 0 (under the lease) commits them all."""
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

    job = _job_id()
    markers = Markers(out)
    if ranks.rank > 0:
        _wait_for_go(out, markers, job)
    writer = StoreWriter(out, settings, owner=ranks.rank == 0, lease=lease)
    if ranks.rank == 0 and ranks.world > 1:
        markers.put_go(job)
    T = cfg.context_size
    stop = hooklib.stop_layer(cfg.hooks, model.n_layers)
    repaired = _repair(out, writer, cfg, model, resolved, stop) if cfg.repair else 0
    if writer.complete:
        return HarvestResult(out, writer.n_contexts, writer.n_contexts * T, 0, 0.0, not repaired, repaired)
    target = writer.settings["n_contexts_target"]
    per = writer.shard_contexts
    done0 = writer.n_contexts
    t_loop = time.perf_counter()
    bar = tqdm(
        total=target * T, initial=done0 * T, unit="tok", unit_scale=True, desc="harvest", disable=not progress
    )
    first_pos = 1 if cfg.prepend_bos else 0
    position, written = 0, 0
    for shard in shards_for_rank(done0 // per, -(-target // per), ranks.rank, ranks.world):
        start = shard * per
        if ranks.world > 1 and markers.has(shard):
            continue  # written by an earlier run of this job; rank 0 commits it from its marker
        rows = list(itertools.islice(contexts, start - position, start - position + min(per, target - start)))
        position = start + len(rows)
        tokens = np.stack(rows) if rows else None
        acts = run_shard(model, resolved, stop, tokens, cfg, start) if rows else {}
        try:
            if ranks.world == 1:
                if not rows:
                    break  # the dataset ran out before the target
                writer.write_shard(start, tokens, acts, first_pos)
            else:
                if rows:
                    writer.write_data(start, tokens, acts)
                markers.put(shard, len(rows), shard_stats(acts, first_pos))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise SaepipeError(
                f"store {out}: {e.strerror} while writing contexts [{start}, {start + len(rows)}) "
                f"({writer.n_contexts} of {target} committed and intact); free space, then rerun the same command "
                "to resume"
            ) from None
        written += len(rows)
        if ranks.rank == 0 and ranks.world > 1:
            _commit_ready(writer, markers, per)
        bar.update(len(rows) * T * (ranks.world if ranks.world > 1 else 1))
        if len(rows) < min(per, target - start):
            break  # the dataset ran out: later shards would be empty too
    if ranks.rank > 0:
        return HarvestResult(
            out, writer.n_contexts, written * T, written * T, time.perf_counter() - t_loop, False
        )
    while ranks.world > 1 and not _commit_ready(writer, markers, per):
        time.sleep(0.2)  # the other ranks' shards
    bar.close()
    markers.clear()
    writer.finish()
    n = writer.n_contexts
    return HarvestResult(out, n, n * T, (n - done0) * T, time.perf_counter() - t_loop, False, repaired)


def _commit_ready(writer: StoreWriter, markers: Markers, per: int) -> bool:
    """Commit, in order, every shard whose marker is there; True once nothing is left to commit."""
    target = writer.settings["n_contexts_target"]
    while writer.n_contexts < target:
        shard = writer.n_contexts // per
        marker = markers.get(shard)
        if marker is None:
            return False
        if marker["rows"]:
            writer.commit(marker["rows"], marker["stats"])
        if marker["rows"] < min(per, target - shard * per):
            return True  # the dataset ran out here
    return True


def _job_id() -> str:
    """Names one launch of a multi-process harvest, so ranks ignore a go-ahead left by a killed one."""
    env = os.environ
    return env.get("TORCHELASTIC_RUN_ID") or f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


def _wait_for_go(out: str, markers: Markers, job: str) -> None:
    """Non-zero ranks start writing only after rank 0 has opened (or created) the store under its lease."""
    while markers.go() != job:
        time.sleep(0.2)


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
