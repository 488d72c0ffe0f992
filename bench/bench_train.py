"""Trainer throughput: tokens/s of saepipe's TopK step vs a plain-PyTorch reference and the FLOP bound.

For each width (default 4096 and 16384; d_in 576 as the default model, k 32, batch 4096) this times, in
one process and one after the other on the same batch:
- `reference`: the plain PyTorch TopK SAE written below (dense encoder, top-k, dense decoder, MSE, Adam);
- `saepipe`: `saepipe.train.step.sae_step` on a TopK SAE, the fastest path (saes/sparse.py);
- `saepipe dense`: the same step with SAEPIPE_DENSE=1 (the dense references inside saepipe);
- `encoder matmul`: the one dense product a step cannot avoid, alone.
The FLOP bound is the measured peak matmul rate divided by the FLOPs a step needs: the encoder forward
(2 d_in width per token) plus the sparse products at the k active latents (decoder forward, its two
gradients, the encoder's weight and input gradients: 10 k d_in per token). Model-FLOP utilisation (MFU) is
tokens/s x FLOPs/token / peak. Target: saepipe >= 1.3x the reference, MFU as high as it gets.

    python -m bench.bench_train [--device auto] [--quick] [--widths 4096 16384] [--batch 4096]
"""

from __future__ import annotations

import os

import torch

from bench.common import best_seconds, device_of, machine, parser, peak_matmul_flops, record


class ReferenceTopK:
    """The plain PyTorch TopK SAE step a user would write first; the baseline the issue asks for."""

    def __init__(self, d_in: int, width: int, k: int, device: torch.device, lr: float = 1e-4):
        W_dec = torch.randn(width, d_in, device=device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = W_dec.clone().requires_grad_()
        self.W_enc = W_dec.t().clone().requires_grad_()
        self.b_enc = torch.zeros(width, device=device, requires_grad=True)
        self.b_dec = torch.zeros(d_in, device=device, requires_grad=True)
        self.k = k
        self.opt = torch.optim.Adam([self.W_enc, self.b_enc, self.W_dec, self.b_dec], lr=lr)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        values, indices = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, indices, values)
        recon = z @ self.W_dec + self.b_dec
        loss = (recon - x).pow(2).sum(-1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def saepipe_step(d_in: int, width: int, k: int, device: torch.device):
    """A closure running one `sae_step` of a fresh TopK SAE (the trainer's inner loop, exactly)."""
    from saepipe.train.saes import build_sae
    from saepipe.train.step import make_optimizer, sae_step

    sae = build_sae("topk", d_in, width, k=k).to(device)
    optimizer = make_optimizer(sae, 1e-4)
    return lambda x: sae_step(sae, optimizer, x, 1e-4)


def step_flops(d_in: int, width: int, k: int) -> int:
    """FLOPs per token one training step needs (see the module docstring)."""
    return 2 * d_in * width + 10 * k * d_in


def measure(d_in: int, width: int, k: int, batch: int, device: torch.device, reps: int) -> dict[str, float]:
    """tokens/s of each contender on the same batch, timed back to back."""
    torch.manual_seed(0)
    x = torch.randn(batch, d_in, device=device) * 3 + 1
    ref = ReferenceTopK(d_in, width, k, device)
    fast = saepipe_step(d_in, width, k, device)
    W, b = ref.W_enc.detach(), ref.b_enc.detach()
    before = os.environ.get("SAEPIPE_DENSE")
    os.environ["SAEPIPE_DENSE"] = "1"
    try:
        dense = saepipe_step(d_in, width, k, device)
        secs_dense = best_seconds(lambda: dense(x), device, reps=max(1, reps - 1))
    finally:
        if before is None:
            os.environ.pop("SAEPIPE_DENSE")
        else:
            os.environ["SAEPIPE_DENSE"] = before
    secs = {
        "reference": best_seconds(lambda: ref.step(x), device, reps=reps),
        "saepipe": best_seconds(lambda: fast(x), device, reps=reps),
        "saepipe dense": secs_dense,
        "encoder matmul": best_seconds(lambda: torch.addmm(b, x, W), device, reps=reps),
    }
    return {name: batch / s for name, s in secs.items()}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--widths", type=int, nargs="+", default=None, help="default 4096 16384 (quick: 4096)")
    p.add_argument("--batch", type=int, default=None, help="tokens per step (default 4096; quick: 2048)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--reps", type=int, default=None, help="timed steps per contender (best counts)")
    args = p.parse_args()
    device = device_of(args.device)
    widths = args.widths or ([4096] if args.quick else [4096, 16384])
    batch = args.batch or (2048 if args.quick else 4096)
    reps = args.reps or (2 if args.quick else 3)
    peak = peak_matmul_flops(device)
    print(
        f"peak matmul: {peak / 1e9:,.1f} GFLOP/s ({machine(args.device)}, {torch.get_num_threads()} threads)"
    )
    for width in widths:
        rates = measure(args.d_in, width, args.k, batch, device, reps)
        # The encoder product is a large matmul too: if it ran faster than the peak shapes did (load on a
        # shared machine shifts between measurements), it is the better estimate of the peak.
        peak = max(peak, rates["encoder matmul"] * 2 * args.d_in * width)
        flops = step_flops(args.d_in, width, args.k)
        bound = peak / flops
        mfu = {name: r * flops / peak for name, r in rates.items()}
        speedup = rates["saepipe"] / rates["reference"]
        print(f"width {width}, k {args.k}, d_in {args.d_in}, batch {batch}:")
        for name, r in rates.items():
            print(f"  {name:15s} {r:10,.0f} tok/s   MFU {mfu[name]:6.1%}")
        print(f"  {'FLOP bound':15s} {bound:10,.0f} tok/s   ({flops / 1e6:.2f} MFLOP/token)")
        print(f"  saepipe / reference: {speedup:.2f}x (target >= 1.3x); MFU {mfu['saepipe']:.1%}")
        record(
            args,
            "trainer throughput",
            f"TopK d_in {args.d_in}, width {width}, k {args.k}, batch {batch}",
            f"saepipe {rates['saepipe']:,.0f} tok/s, reference {rates['reference']:,.0f}, "
            f"saepipe dense {rates['saepipe dense']:,.0f}, encoder matmul alone "
            f"{rates['encoder matmul']:,.0f}; FLOP bound {bound:,.0f} (peak {peak / 1e9:,.0f} GFLOP/s)",
            f"{speedup:.2f}x reference (target >= 1.3); MFU {mfu['saepipe']:.0%} "
            f"(reference {mfu['reference']:.0%}, matmul alone {mfu['encoder matmul']:.0%})",
        )


if __name__ == "__main__":
    main()
