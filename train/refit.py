"""`saepipe refit`: a trained TopK SAE's decoder re-solved with matching-pursuit codes (train/pursuit.py),
written as a new SAE dir.

Why: the decoder of an SAE trained with its own one-layer encoder leans towards codes that encoder can
reach; the best k-sparse codes for the same width and k pull its rows onto the data's directions (on
SynthSAEBench at 2M samples: Matryoshka 0.31 -> 0.51 of the true features recovered, TopK 0.32 -> 0.39;
bench/RESULTS.md "Pursuit refit").
The new dir is an ordinary TopK SAE (same width, k, hook and store record; a TopK encoder fitted to the new
decoder), so every later stage reads it; cfg.json's `saepipe.pursuit_refit` says where it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import save

from saepipe.config import StageConfig
from saepipe.errors import SaepipeError
from saepipe.files import check_out_dir, write_bytes_atomic, write_text_atomic
from saepipe.harvest.devices import resolve_device
from saepipe.harvest.store import open_store
from saepipe.train.pursuit import fit_encoder, mean_sq_error, omp, refit_decoder, topk_codes
from saepipe.train.sae_dir import CFG, WEIGHTS, SAERecord, load_sae


class RefitConfig(StageConfig):
    sae: str
    """A trained SAE dir that encodes by TopK on raw inputs (topk, or matryoshka with token selection)."""
    out: str
    """The refit SAE dir to write (replaced if it is an SAE dir already, or one an interrupted refit left)."""
    store: str | None = None
    """The activation store to fit on (default: the SAE's training store)."""
    hook: str | None = None
    """Hook to read (default: the SAE's hook_name)."""
    tokens: int = Field(131072, gt=0)
    """Tokens from the start of the store (whole contexts; BOS and special-token positions are skipped)."""
    iterations: int = Field(6, gt=0)
    """Rounds of pursuit codes for every token followed by the least-squares decoder."""
    encoder_steps: int = Field(4000, ge=0)
    """Adam steps (256 tokens each) fitting the new TopK encoder to the new decoder, from the old encoder."""
    encoder_lr: float = Field(3e-3, gt=0)
    """Learning rate of the encoder fit."""
    batch_tokens: int = Field(16384, gt=0)
    """Tokens coded at once (memory: batch_tokens x width floats)."""
    device: str = "cpu"
    """Device to compute on (cpu, cuda, cuda:N, auto)."""
    seed: int = 0
    """Seed of the encoder fit's batch sampling (the rest is deterministic)."""


def _not_an_sae_dir(path: Path) -> str | None:
    """Refuse a directory holding anything but an SAE dir's two files (or what an interrupted refit left)."""
    if any(p.name not in (CFG, WEIGHTS) and not p.name.startswith(".") for p in path.iterdir()):
        return "is not an SAE dir"
    return None


def read_tokens(cfg: RefitConfig, record: SAERecord) -> torch.Tensor:
    """[n, d_in] float32 activations of the first `cfg.tokens` tokens, BOS and special positions dropped."""
    store = open_store(cfg.store or record.store_path or "")
    record.compatible_with(store, cfg.sae)
    hook = cfg.hook or record.hook_name
    if hook not in store.hooks:
        raise SaepipeError(f"store {store.path} has no hook {hook!r} (it has {store.hooks}); give --hook")
    n_ctx = min(store.n_contexts, -(-cfg.tokens // store.context_size))
    acts = store.activations(hook, 0, n_ctx).astype(np.float32)  # [ctx, pos, d]
    keep = np.ones(acts.shape[:2], dtype=bool)
    keep[:, : store.info.first_position] = False
    if store.special_token_ids:
        keep &= ~np.isin(store.tokens(0, n_ctx), store.special_token_ids)
    return torch.from_numpy(acts[keep])


def run(cfg: RefitConfig) -> int:
    sae = load_sae(cfg.sae)
    if sae.cfg["architecture"] != "topk" or sae.cfg.get("normalize_activations", "none") != "none":
        raise SaepipeError(
            f"{cfg.sae} does not encode by TopK on raw inputs; give a topk SAE dir (or a matryoshka one trained "
            "with --matryoshka-selection token), not one trained with --token-norm"
        )
    record = SAERecord.of(sae)
    if cfg.store is None and record.store_path is None:
        raise SaepipeError(f"{cfg.sae} records no training store; give --store")
    check_out_dir(cfg.out, "give a directory for the refit SAE dir", _not_an_sae_dir)
    device = resolve_device(cfg.device)
    x = read_tokens(cfg, record).to(device)
    if len(x) == 0:
        raise SaepipeError(f"no tokens to fit on in the first {cfg.tokens} of the store; raise --tokens")
    sae = sae.to(device)
    b_dec = sae.b_dec.detach()
    xc = x - b_dec
    variance = float((x - x.mean(0)).pow(2).sum(-1).mean())
    batches = lambda: xc.split(cfg.batch_tokens)  # noqa: E731
    with torch.no_grad():
        W, steps = refit_decoder(batches, sae.W_dec.detach(), sae.k, cfg.iterations, variance)
        final = mean_sq_error(batches(), W, lambda x: omp(x, W, sae.k)) / variance
    for s in steps:
        print(f"iteration {s.iteration}: pursuit FVU {s.fvu:.4f} ({s.unused} latents unused)")
    print(f"refit decoder: pursuit FVU {final:.4f}")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    sample = lambda: xc[torch.randint(0, len(xc), (256,), generator=gen, device=device)]  # noqa: E731
    start = (sae.W_enc.detach(), sae.b_enc.detach())
    norms = sae.W_dec.detach().norm(dim=1)  # the new rows are unit norm: codes grow by the old row norms
    W_enc, b_enc = fit_encoder(
        sample, W, (start[0] * norms, start[1] * norms), sae.k, cfg.encoder_steps, cfg.encoder_lr
    )
    with torch.no_grad():
        before = (
            mean_sq_error(batches(), sae.W_dec.detach(), lambda x: topk_codes(x, *start, sae.k)) / variance
        )
        after = mean_sq_error(batches(), W, lambda x: topk_codes(x, W_enc, b_enc, sae.k)) / variance
    print(f"TopK encode FVU on the fitting tokens: {before:.4f} before, {after:.4f} refit")
    own = dict(sae.cfg["saepipe"])
    own["pursuit_refit"] = {
        "from": str(cfg.sae),
        "tokens": len(xc),
        "iterations": cfg.iterations,
        "pursuit_fvu": [s.fvu for s in steps] + [final],
        "encoder_steps": cfg.encoder_steps,
        "encoder_lr": cfg.encoder_lr,
        "topk_fvu_before": before,
        "topk_fvu_after": after,
    }
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W, "b_dec": b_dec}
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / CFG).unlink(missing_ok=True)  # cfg.json comes last: until then the dir is plainly unfinished
    write_bytes_atomic(out / WEIGHTS, save({k: v.float().cpu().contiguous() for k, v in tensors.items()}))
    write_text_atomic(out / CFG, json.dumps({**sae.cfg, "saepipe": own}, indent=2) + "\n")
    print(f"refit SAE dir written to {out}")
    return 0
