"""Memory: peak RSS of training and of analysis stays flat as the store grows 4x (streaming, never whole).

Each measurement runs in a fresh child process (so peaks do not mix) over one whole epoch of a synthetic
store (d_model 576, float16) larger than the loader's buffer, once at size S and once at 4S:
- train: `saepipe.train.trainer.train`, one small TopK SAE (the stream dominates, not the model);
- analysis: the streaming statistics pass of `saepipe analyze` (`saepipe.analyze.stats.collect_stats`)
  through that SAE's encoder; the rest of `analyze` (model load, logit effects, report) does not depend
  on the store's size, and a synthetic store has no model to load.
Target: the 4S peak within a few percent of the S peak, far below what the store would take in memory.

    python -m bench.bench_memory [--device auto] [--quick] [--tokens 262144]
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from bench.common import WORK, parser, peak_rss_mb, record, synthetic_store

BUFFER_TOKENS = {False: 65_536, True: 16_384}
"""Loader mixing buffer by --quick (several windows of it are in memory at once); every store is larger."""


def child(kind: str, store: str, device: str, buffer_tokens: int) -> None:
    """Run one workload and print its peak RSS (MiB) as the last line."""
    from saepipe.harvest import open_store

    n_tokens = open_store(store).n_tokens
    if kind == "train":
        from saepipe.train.config import TrainConfig
        from saepipe.train.trainer import train

        out = str(WORK / "memory-run")
        shutil.rmtree(out, ignore_errors=True)
        cfg = TrainConfig(
            stores=[store], hook="synthetic", out=out, width=[512], k=[32], tokens=n_tokens, batch_size=4096,
            buffer_tokens=buffer_tokens, device=device, resume=False, log_every=10**9,
            checkpoint_every=10**9, b_dec_init="mean",
        )  # fmt: skip
        train(cfg)
        shutil.rmtree(out, ignore_errors=True)
    else:
        import torch

        from saepipe.analyze.stats import collect_stats
        from saepipe.harvest.devices import resolve_device
        from saepipe.train.saes import build_sae

        torch.manual_seed(0)
        dev = resolve_device(device)
        sae = build_sae("topk", 576, 4096, k=32).to(dev)
        with torch.no_grad():
            collect_stats(open_store(store), "synthetic", sae.encode, 4096, 20, 16, dev, progress=False)
    print(f"{peak_rss_mb():.1f}")


def peak_of(kind: str, store: str, device: str, quick: bool) -> float:
    cmd = [sys.executable, "-m", "bench.bench_memory", "--child", kind, "--store", store, "--device", device]
    cmd += ["--quick"] if quick else []
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=None, help="smaller store (default 262,144; quick 65,536)")
    p.add_argument("--child", choices=["train", "analyze"], help=argparse_hidden())
    p.add_argument("--store", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args.child, args.store, args.device, BUFFER_TOKENS[args.quick])
        return
    small = args.tokens or (65_536 if args.quick else 262_144)
    stores = {n: synthetic_store(n) for n in (small, 4 * small)}
    peaks = {
        (kind, n): peak_of(kind, s, args.device, args.quick)
        for kind in ("train", "analyze")
        for n, s in stores.items()
    }
    growth = {kind: peaks[kind, 4 * small] / peaks[kind, small] for kind in ("train", "analyze")}
    store_mb = {n: n * 576 * 2 / 2**20 for n in stores}
    for kind in ("train", "analyze"):
        print(
            f"{kind}: peak RSS {peaks[kind, small]:,.0f} MiB at {small:,} tokens ({store_mb[small]:,.0f} MiB "
            f"store), {peaks[kind, 4 * small]:,.0f} MiB at {4 * small:,} ({store_mb[4 * small]:,.0f} MiB); "
            f"growth {growth[kind]:.2f}x (flat = 1.00)"
        )
    record(
        args,
        "memory, store grows 4x",
        f"synthetic fp16 d 576 stores {small:,} and {4 * small:,} tokens ({store_mb[small]:,.0f} / "
        f"{store_mb[4 * small]:,.0f} MiB), buffer {BUFFER_TOKENS[args.quick]:,}; one epoch each",
        f"train peak RSS {peaks['train', small]:,.0f} -> {peaks['train', 4 * small]:,.0f} MiB; analysis "
        f"stats pass {peaks['analyze', small]:,.0f} -> {peaks['analyze', 4 * small]:,.0f} MiB",
        f"train {growth['train']:.2f}x, analysis {growth['analyze']:.2f}x (target: flat, ~1.0x)",
    )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
