"""Does an architecture keep the features TopK found? Continue a trained TopK SAE as another architecture.

Loads a TopK SAE dir trained on a synthetic set (`saepipe synth`), copies its weights into a fresh SAE of
each `--arch` (same width; JumpReLU with `--target-l0` and thresholds starting at `--threshold-init` in the
training units, where E||x||^2 = d_model), and trains each for `--steps` steps of `--batch` tokens of the set
at a constant `--lr`, printing the fraction of true features whose best decoder row has |cos| >= 0.9 and the
mean best |cos| every 1,000 steps. Why: BatchTopK and JumpReLU find no SynthSAEBench feature from random
weights; if they keep TopK's when started there, the failure is the start, not the objective.

    python -m bench.warm_start --sae RUN/topk-w2048-k11 --truth SYNTH_DIR --arch topk batchtopk jumprelu
"""

from __future__ import annotations

import numpy as np
import torch

from bench.common import parser
from saepipe.analyze.recovery import cosine_matrix
from saepipe.harvest.store import open_store
from saepipe.harvest.synthetic import open_truth
from saepipe.train import load_sae
from saepipe.train.saes import build_sae
from saepipe.train.step import make_optimizer, sae_step


def recovered(sae, directions: np.ndarray) -> tuple[float, float]:
    """Fraction of true features whose best decoder row has |cos| >= 0.9, and the mean best |cos|."""
    best = np.abs(cosine_matrix(directions, sae.W_dec.detach().numpy())).max(1)
    return float(np.mean(best >= 0.9)), float(best.mean())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sae", required=True, help="a trained TopK SAE dir")
    p.add_argument("--truth", required=True, help="the `saepipe synth --out` it was trained on")
    p.add_argument("--arch", nargs="+", default=["topk", "batchtopk", "jumprelu"])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=256, help="tokens per step (a multiple of the context size)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--target-l0", type=float, default=11.0, help="jumprelu's target L0")
    p.add_argument("--threshold-init", type=float, default=2.0, help="jumprelu's starting threshold")
    args = p.parse_args()
    torch.manual_seed(0)
    truth, base = open_truth(args.truth), load_sae(args.sae)
    scale = float(base.cfg["saepipe"]["input_scale"])
    per_step = max(1, args.batch // truth.context_size)
    n_ctx = open_store(truth.store_path).n_contexts

    def batch(i: int) -> torch.Tensor:
        start = (i * per_step) % (n_ctx - per_step)
        x = truth.codes(start, start + per_step) @ truth.directions.astype(np.float64) + truth.bias
        return torch.from_numpy((x * scale).astype(np.float32))

    for arch in args.arch:
        if arch == "jumprelu":
            hp = {"target_l0": args.target_l0, "threshold_init": args.threshold_init}
            sae = build_sae(arch, base.d_in, base.d_sae, hparams=hp)
        else:
            sae = build_sae(arch, base.d_in, base.d_sae, k=base.k)
        with torch.no_grad():  # the SAE dir holds the weights with the input scale folded in
            sae.W_enc.copy_(base.W_enc / scale)
            sae.b_enc.copy_(base.b_enc)
            sae.W_dec.copy_(base.W_dec * scale)
            sae.b_dec.copy_(base.b_dec * scale)
        sae.dead_window = 100_000
        opt = make_optimizer(sae, args.lr)
        frac, mean = recovered(sae, truth.directions)
        print(f"{arch}: start recovered {frac:.3f}, mean best |cos| {mean:.3f}", flush=True)
        for step in range(1, args.steps + 1):
            sae_step(sae, opt, batch(step), args.lr)
            if step % 1000 == 0 or step == args.steps:
                frac, mean = recovered(sae, truth.directions)
                print(f"{arch}: step {step} recovered {frac:.3f}, mean best |cos| {mean:.3f}", flush=True)


if __name__ == "__main__":
    main()
