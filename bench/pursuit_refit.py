"""Pursuit refit of a trained TopK SAE (train/pursuit.py): how far does the amortisation gap hold it back?

Reads the first `--tokens` tokens of the SAE's store, alternates orthogonal-matching-pursuit codes (the SAE's
k per token) with a least-squares decoder `--iterations` times starting from the SAE's decoder, then fits a
TopK encoder to the new decoder (`--encoder-steps` Adam steps of 256 tokens) and writes the result to
`--out` as an ordinary SAE dir (cfg.json gains `saepipe.pursuit_refit`; decoder rows unit norm). It prints
each iteration's FVU under pursuit codes and, with `--truth`, the fraction of true features whose best
decoder row has |cos| >= 0.9 (score the written dir with `saepipe recovery` for the full table):

    python -m bench.pursuit_refit --sae RUN/topk-w2048-k11 --truth SYNTH_DIR --out RUN/topk-w2048-k11-refit
    saepipe recovery --sae RUN/topk-w2048-k11-refit --truth SYNTH_DIR --max-tokens 262144 --out refit.json
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from bench.common import parser, record
from saepipe.analyze.recovery import cosine_matrix
from saepipe.errors import SaepipeError
from saepipe.harvest.store import open_store
from saepipe.harvest.synthetic import open_truth
from saepipe.train import load_sae
from saepipe.train.pursuit import fit_encoder, omp, refit_decoder
from saepipe.train.sae_dir import CFG, WEIGHTS, SAERecord


def recovered(W: torch.Tensor, directions: np.ndarray | None) -> str:
    if directions is None:
        return ""
    best = np.abs(cosine_matrix(directions, W.numpy())).max(1)
    return f", recovered {np.mean(best >= 0.9):.3f} (mean best |cos| {best.mean():.3f})"


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--sae",
        required=True,
        help="a trained SAE dir with TopK inference (topk, token-selection matryoshka)",
    )
    p.add_argument("--out", required=True, help="the refit SAE dir to write")
    p.add_argument("--store", help="default: the SAE's training store")
    p.add_argument("--truth", help="a `saepipe synth --out` dir: print recovery at each iteration")
    p.add_argument("--tokens", type=int, default=131072, help="tokens from the store's start")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--encoder-steps", type=int, default=4000)
    p.add_argument("--encoder-lr", type=float, default=3e-3)
    args = p.parse_args()
    torch.manual_seed(0)
    sae = load_sae(args.sae)
    if sae.cfg["architecture"] != "topk" or sae.cfg.get("normalize_activations", "none") != "none":
        raise SaepipeError(
            f"{args.sae} does not encode by TopK on raw inputs; give a topk (or token-selection matryoshka) SAE dir"
        )
    record_ = SAERecord.of(sae)
    store = open_store(args.store or record_.store_path)
    record_.compatible_with(store, args.sae)
    n_ctx = min(store.n_contexts, -(-args.tokens // store.context_size))
    x = torch.from_numpy(store.activations(record_.hook_name, 0, n_ctx).astype(np.float32)).reshape(
        -1, store.d_model
    )
    b_dec = sae.b_dec.detach()
    xc = x - b_dec
    variance = float((x - x.mean(0)).pow(2).sum(-1).mean())
    directions = open_truth(args.truth).directions if args.truth else None
    batches = lambda: (xc[s : s + 16384] for s in range(0, len(xc), 16384))  # noqa: E731

    with torch.no_grad():
        W0 = sae.W_dec.detach()
        print(
            f"start: {len(xc):,} tokens, width {sae.d_sae}, k {sae.k}{recovered(W0, directions)}", flush=True
        )
        W, steps = refit_decoder(batches, W0, sae.k, args.iterations, variance)
        atoms, values = omp(xc, W, sae.k)
        final_fvu = (
            float((xc - torch.einsum("nk,nkd->nd", values, W[atoms])).pow(2).sum(-1).mean()) / variance
        )
    for s in steps:
        print(
            f"iteration {s.iteration}: pursuit FVU {s.fvu:.4f} with the decoder before it, {s.unused} latents unused"
        )
    print(f"refit decoder: pursuit FVU {final_fvu:.4f}{recovered(W, directions)}", flush=True)

    enc, bias = fit_encoder(
        lambda: xc[torch.randint(0, len(xc), (256,))],
        W,
        sae.W_enc.detach(),
        sae.k,
        args.encoder_steps,
        args.encoder_lr,
    )
    with torch.no_grad():

        def topk_fvu(W_enc, b_enc, W_dec):
            v, i = torch.relu(xc @ W_enc + b_enc).topk(sae.k, -1)
            return float((xc - torch.einsum("nk,nkd->nd", v, W_dec[i])).pow(2).sum(-1).mean()) / variance

        before, after = topk_fvu(sae.W_enc, sae.b_enc, W0), topk_fvu(enc, bias, W)
    print(f"TopK encode FVU: {before:.4f} with the SAE's encoder and decoder, {after:.4f} refit")

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = dict(sae.cfg)
    cfg["saepipe"] = {
        **cfg["saepipe"],
        "pursuit_refit": {
            "from": str(args.sae),
            "tokens": len(xc),
            "iterations": args.iterations,
            "pursuit_fvu": [s.fvu for s in steps] + [final_fvu],
            "encoder_steps": args.encoder_steps,
            "encoder_lr": args.encoder_lr,
            "topk_fvu_before": before,
            "topk_fvu_after": after,
        },
    }
    save_file(
        {
            "W_enc": enc.contiguous(),
            "b_enc": bias.contiguous(),
            "W_dec": W.contiguous(),
            "b_dec": b_dec.contiguous(),
        },
        out / WEIGHTS,
        metadata={"format": "pt"},
    )
    (out / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"wrote {out}")
    figures = f"pursuit FVU {steps[0].fvu:.4f} -> {final_fvu:.4f}; TopK FVU {before:.4f} -> {after:.4f}"
    if directions is not None:
        figures += f"; {recovered(W0, directions)[2:]} -> {recovered(W, directions)[2:]}"
    record(
        args,
        "pursuit_refit",
        f"{args.sae}, {len(xc):,} tokens, {args.iterations} iterations",
        figures,
        "",
        "cpu",
    )


if __name__ == "__main__":
    main()
