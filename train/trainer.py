"""The training loop: read the stream once, step every SAE on each batch, log, checkpoint, save.

    init ranks -> open the stream -> build SAEs (or restore the checkpoint) -> for each step:
        batch -> for each SAE: sae_step (loss, backward, gradient mean over ranks, Adam, constraints)
        -> log every `log_every` -> checkpoint every `checkpoint_every`
    -> write <out>/<name>/ SAE dirs (rank 0)

Learning rate: linear warm-up over `lr_warmup` of the steps, constant, linear decay to 0 over the last
`lr_decay`. Sparsity coefficients (relu's L1, jumprelu's L0) rise linearly over `sparsity_warmup`.
Both are pure functions of the step, so the "scheduler state" in a checkpoint is the step itself.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from saepipe.errors import SaepipeError
from saepipe.files import check_out_dir
from saepipe.harvest.devices import resolve_device
from saepipe.train import checkpoint, distributed, token_norm
from saepipe.train.config import SAESpec, TrainConfig
from saepipe.train.loader import ActivationLoader, StreamPosition
from saepipe.train.metrics import IntervalMetrics, Reporter
from saepipe.train.monitor import Monitor, details
from saepipe.train.sae_dir import save_sae
from saepipe.train.saes import ARCHITECTURES, SAE, build_sae
from saepipe.train.step import make_optimizer, sae_step

# Settings that may change between a run and its resumption without changing the result.
FREE_TO_CHANGE = {"log_every", "checkpoint_every", "wandb", "wandb_project", "device", "resume"}
FREE_TO_CHANGE |= {"eval_every", "eval_contexts"}  # what train/monitor.py logs, not what is trained


@dataclass
class TrainResult:
    out: Path
    sae_dirs: dict[str, Path]
    steps: int
    tokens: int
    resumed_from: int
    seconds: float
    already_complete: bool = False


def lr_at(step: int, total: int, cfg: TrainConfig, width: int | None = None) -> float:
    """The learning rate at `step` of `total`: warm-up, plateau, decay; scaled for `width` when the run has
    an `lr_reference_width`."""
    scale = math.sqrt(cfg.lr_reference_width / width) if cfg.lr_reference_width and width else 1.0
    warm = max(1, round(cfg.lr_warmup * total)) if cfg.lr_warmup > 0 else 0
    decay = round(cfg.lr_decay * total)
    factor = 1.0
    if step < warm:
        factor = (step + 1) / warm
    if decay and step >= total - decay:
        factor = min(factor, (total - step) / decay)
    return cfg.lr * scale * factor


def k_at(step: int, total: int, cfg: TrainConfig, k: int | None, width: int) -> int | None:
    """The training k at `step`: k_anneal_start x k falling linearly to k over the first k_anneal of steps."""
    span = round(cfg.k_anneal * total)
    if k is None or span == 0 or step >= span:
        return None
    return min(width, round(k * (cfg.k_anneal_start - (cfg.k_anneal_start - 1) * step / span)))


def token_warmup_at(step: int, total: int, cfg: TrainConfig) -> bool:
    """Whether batch-selection and JumpReLU SAEs keep each token's k largest at `step` (the first
    token_selection_warmup of the steps)."""
    return step < round(cfg.token_selection_warmup * total)


def sparsity_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = round(cfg.sparsity_warmup * total)
    return 1.0 if warm == 0 else min(1.0, (step + 1) / warm)


def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm in float64 (the b_dec start of Bricken et al. 2023)."""
    p = points.double()
    y = p.mean(0)
    for _ in range(iterations):
        w = 1.0 / (p - y).norm(dim=1).clamp_min(1e-12)
        nxt = (w[:, None] * p).sum(0) / w.sum()
        if (nxt - y).norm() <= tol * max(1.0, float(y.norm())):
            return nxt
        y = nxt
    return y


def b_dec_start(cfg: TrainConfig, loader: ActivationLoader) -> torch.Tensor:
    """The decoder bias start, identical on every rank, in the (possibly normalised) input space."""
    if cfg.b_dec_init == "zeros":
        return torch.zeros(loader.d_model)
    if cfg.b_dec_init == "mean" and not (cfg.token_norm or cfg.drop_norm_above):
        # the stores' own statistics: the same on every rank, no reading
        stats = [s.stats(cfg.hook) for s in loader.stores]
        count = sum(st.count for st in stats)
        mean = sum(st.count * st.mean for st in stats) / max(count, 1)
        return torch.from_numpy(np.asarray(mean * loader.scale, dtype=np.float32))
    sample = torch.from_numpy(loader.load_window(0, 0).rows[:8192])
    start = sample.double().mean(0) if cfg.b_dec_init == "mean" else geometric_median(sample)
    return distributed.all_reduce_mean(start.float().to(loader.device))  # NCCL wants CUDA


def build_saes(cfg: TrainConfig, d_in: int, input_rms: float = 1.0) -> dict[str, SAE]:
    """Freshly initialised SAEs of the run, seeded so every rank builds the same ones. The budgets of one
    (arch, width, k, seed) start from the same weights, so a budget curve differs in training length alone.
    `input_rms` (RMS per dimension of what the SAEs see) converts settings given in its units.

    The SAEs of each seed are drawn in order from a generator reset to that seed, so the first seed's SAEs
    are exactly those a run with that seed alone builds, and another seed changes nothing else."""
    specs = cfg.specs()
    saes: dict[str, SAE] = {}
    first: dict[tuple, SAE] = {}
    for seed in cfg.seed:
        torch.manual_seed(seed)
        for spec in (s for s in specs if s.seed == seed):
            key = (spec.arch, spec.width, spec.k, spec.seed)
            if key not in first:
                scaled = ARCHITECTURES[spec.arch].scaled_hparams
                hparams = {k: v * input_rms if k in scaled else v for k, v in spec.hparams.items()}
                first[key] = build_sae(spec.arch, d_in, spec.width, k=spec.k, hparams=hparams)
            sae = copy.deepcopy(first[key])
            sae.dead_window = cfg.resolved_dead_window(spec.tokens)
            sae.decoder_ortho = cfg.decoder_ortho
            saes[spec.name] = sae
    return saes


def input_rms(loader: ActivationLoader) -> float:
    """RMS per dimension of the training input (1 after --normalize or --token-norm), from the stores'
    statistics."""
    if loader.token_norm:
        return 1.0  # every row is scaled to norm sqrt(d_model)
    stats = [s.stats(loader.hook) for s in loader.stores]
    count = sum(st.count for st in stats)
    if count == 0:
        return 1.0
    msn = sum(st.count * st.mean_sq_norm for st in stats) / count
    return float(np.sqrt(msn / loader.d_model)) * loader.scale


def _compared(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in FREE_TO_CHANGE}


def check_out(out: Path) -> None:
    """Refuse an unusable --out before reading any store (a run dir is a directory we can write in)."""
    check_out_dir(out, "give a directory for the run")


def train(cfg: TrainConfig) -> TrainResult:
    started = time.perf_counter()
    out = Path(cfg.out)
    check_out(out)
    if cfg.device != "auto":
        resolve_device(cfg.device)  # a one-line refusal for a device that is not there
    info = distributed.init(cfg.device)
    config = {**cfg.model_dump(), "world_size": info.world_size}
    specs = cfg.specs()
    sae_dirs = {s.name: out / s.name for s in specs}
    if checkpoint.exists(out) and cfg.resume and checkpoint.read_state(out).get("complete"):
        _refuse_different(out, checkpoint.read_state(out)["config"], config)
        distributed.print0(f"run {out} is already complete; nothing to do")
        return TrainResult(out, sae_dirs, 0, 0, 0, 0.0, already_complete=True)

    loader = ActivationLoader(
        cfg.stores, cfg.hook, cfg.batch_size, cfg.buffer_tokens, cfg.seed[0], info.rank, info.world_size,
        cfg.drop_bos, cfg.normalize, info.device, follow=cfg.follow, drop_special=cfg.drop_special,
        special_token_ids=cfg.special_token_ids, drop_norm_above=cfg.drop_norm_above, token_norm=cfg.token_norm,
    )  # fmt: skip
    monitor = Monitor(cfg, loader.stores[0], info.device, info.is_main)  # spliced evals (train/monitor.py)
    global_batch = cfg.batch_size * info.world_size
    totals = {s.name: max(1, s.tokens // global_batch) for s in specs}  # steps of each SAE
    total = max(totals.values())
    built = build_saes(cfg, loader.d_model, input_rms(loader))
    saes = {name: sae.to(info.device) for name, sae in built.items()}
    optimizers = {name: make_optimizer(sae, cfg.lr) for name, sae in saes.items()}

    start_step, position, wandb_id = 0, StreamPosition(), None
    if checkpoint.exists(out) and cfg.resume:
        _refuse_different(out, checkpoint.read_state(out)["config"], config)
        ck = checkpoint.load(out, saes, optimizers, info.device)
        start_step, position, wandb_id = ck.step, ck.position, ck.wandb_id
        distributed.print0(f"resuming {out} at step {start_step:,} of {total:,}")
    else:
        b_dec = b_dec_start(cfg, loader).to(info.device)
        with torch.no_grad():
            for sae in saes.values():
                sae.b_dec.copy_(b_dec)
    if not distributed.all_agree(start_step, info.device):
        raise SaepipeError(
            f"ranks disagree on the checkpoint step in {out}; remove {out}/checkpoint to restart"
        )

    reporter = Reporter(
        cfg.wandb, cfg.wandb_project, str(out), out.name, config, wandb_id, enabled=info.is_main
    )
    metrics = {name: IntervalMetrics(sae.d_sae) for name, sae in saes.items()}
    autocast = (
        torch.autocast(info.device.type, dtype=torch.bfloat16)
        if cfg.autocast == "bfloat16"
        else contextlib.nullcontext()
    )
    stream = loader.batches(position)
    try:
        for step in range(start_step, total):
            batch = next(stream)
            for name, sae in saes.items():
                if step >= totals[name]:
                    continue  # this SAE's budget is spent; the stream goes on for the larger ones
                lr, scale = lr_at(step, totals[name], cfg, sae.d_sae), sparsity_at(step, totals[name], cfg)
                sae.train_k = k_at(step, totals[name], cfg, sae.k, sae.d_sae)
                sae.token_warmup = token_warmup_at(step, totals[name], cfg)
                with autocast:
                    res = sae_step(sae, optimizers[name], batch.x, lr, scale, n_tokens=global_batch)
                metrics[name].add(res.out, batch.x, res.fire_counts, res.n_tokens)
            done = step + 1
            if done % cfg.log_every == 0 or done == total or done in totals.values():
                per_sae = {name: m.summary(saes[name]) for name, m in metrics.items() if m.steps}
                schedule = lr_at(step, total, cfg), sparsity_at(step, total, cfg)  # of the longest budget
                reporter.log(done, total, done * global_batch, per_sae, extra=details(*schedule, saes))
                metrics = {name: IntervalMetrics(sae.d_sae) for name, sae in saes.items()}
            if monitor.due(done, total):
                reporter.log_extra(done, monitor.evaluate(done, saes, loader.scale))
            if done % cfg.checkpoint_every == 0 and done < total:
                _check_finite(saes, done, out)  # never replace a good checkpoint with a diverged one
                with _disk_full_is_an_error(out, f"the checkpoint of step {done:,}"):
                    checkpoint.save(out, done, config, reporter.wandb_id, saes, optimizers, batch.position)
    finally:
        stream.close()

    _check_finite(saes, total, out)
    with _disk_full_is_an_error(out, "the SAE dirs"):
        if info.is_main:
            for spec in specs:
                extra = _sae_extra(cfg, loader, spec, totals[spec.name], global_batch)
                if len(cfg.seed) > 1:  # which seed this one is (a single-seed run's dirs stay as they were)
                    extra["saepipe"]["seed"] = spec.seed
                save_sae(
                    saes[spec.name],
                    sae_dirs[spec.name],
                    hook_name=cfg.hook,
                    model_name=loader.stores[0].info.model_name,
                    input_scale=loader.scale,
                    **extra,
                )
        checkpoint.save(out, total, {**config}, reporter.wandb_id, saes, optimizers, StreamPosition())
        if info.is_main:
            checkpoint.mark_complete(out)
    reporter.finish()
    return TrainResult(
        out, sae_dirs, total - start_step, (total - start_step) * global_batch, start_step,
        time.perf_counter() - started,
    )  # fmt: skip


def _sae_extra(
    cfg: TrainConfig, loader: ActivationLoader, spec: SAESpec, steps: int, global_batch: int
) -> dict:
    first = loader.stores[0]
    return {
        **({"normalize_activations": token_norm.CFG_VALUE} if cfg.token_norm else {}),
        "context_size": first.context_size,
        "prepend_bos": first.info.prepend_bos,
        "dataset_path": first.info.dataset_name,
        "saepipe": {
            "store": [
                {
                    "path": str(s.path),
                    "model_fingerprint": s.info.model_fingerprint,
                    "hook": cfg.hook,
                }
                for s in loader.stores
            ],
            "training": {
                **cfg.model_dump(exclude={"wandb", "wandb_project", "resume", "device"}),
                "tokens": spec.tokens,
                "dead_window": cfg.resolved_dead_window(spec.tokens),
                "steps": steps,
                "global_batch": global_batch,
                "world_size": distributed.world_size(),
            },
        },
    }


@contextlib.contextmanager
def _disk_full_is_an_error(out: Path, what: str):
    """A full disk stops the run with one line; checkpoints are swapped in by rename, so the last complete
    one is intact and rerunning the same command resumes from it."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        full = (
            e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            if isinstance(e, OSError)
            else "os error 28" in str(e)
        )
        if not full:  # safetensors reports ENOSPC as its own error type, with the OS error in the text
            raise
        raise SaepipeError(
            f"run {out}: {os.strerror(errno.ENOSPC) if not isinstance(e, OSError) else e.strerror} while writing "
            f"{what}; the last complete checkpoint is kept; free space, then rerun the same command to resume"
        ) from None


def _check_finite(saes: dict[str, SAE], step: int, out: Path) -> None:
    """Refuse to save weights that went NaN/inf (a diverged run); the last checkpoint stays as it was."""
    for name, sae in saes.items():
        bad = [n for n, p in sae.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            kept = checkpoint.read_state(out)["step"] if checkpoint.exists(out) else None
            raise SaepipeError(
                f"training diverged: SAE {name} has NaN/inf in {', '.join(bad)} at step {step:,}; nothing was saved "
                + (
                    f"(the checkpoint of step {kept:,} is kept)"
                    if kept is not None
                    else "(no checkpoint yet)"
                )
                + "; lower --lr and rerun with --no-resume or a new --out"
            )


def _refuse_different(out: Path, have: dict, want: dict) -> None:
    a, b = _compared(have), _compared(want)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            raise SaepipeError(
                f"run {out} was started with {key}={a.get(key)!r}, not {b.get(key)!r}; rerun with the same "
                "settings to resume, pass --no-resume to start over, or choose a new --out"
            )


__all__ = ["TrainResult", "build_saes", "geometric_median", "lr_at", "sparsity_at", "train"]
