"""Analysis: tokens/s of `saepipe analyze` vs the SAE encoder alone on the same activations.

On a store harvested from the default model (built once) with a TopK SAE trained on it briefly, this
times, in one process:
- `encoder alone`: `sae.encode` over the store's activations already in memory, batch by batch;
- `stats pass`: the streaming pass of `saepipe analyze` (read, encode, running top-k contexts, samples,
  histograms; `saepipe.analyze.stats.collect_stats`), the part that scales with the store;
- `saepipe analyze`: the whole command (also model load, logit effects, report and dashboard, fixed costs
  that a small store makes look large).
Target: analyze >= 0.8x the encoder alone.

    python -m bench.bench_analyze [--device auto] [--quick] [--tokens 32768] [--width 16384]
"""

from __future__ import annotations

import shutil
import time

import torch

from bench.common import WORK, append_result, device_of, harvested_store, machine, parser, sync

HOOK = "blocks.3.hook_resid_post"


def main() -> None:
    from saepipe.analyze.analysis import analyze
    from saepipe.analyze.config import AnalyzeConfig
    from saepipe.analyze.stats import collect_stats
    from saepipe.harvest import open_store
    from saepipe.train import load_sae
    from saepipe.train.config import TrainConfig
    from saepipe.train.trainer import train

    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=None, help="store size (default 32,768; quick 8,192)")
    p.add_argument("--width", type=int, default=None, help="SAE width (default 16384; quick 4096)")
    args = p.parse_args()
    device = device_of(args.device)
    tokens = args.tokens or (8_192 if args.quick else 32_768)
    width = args.width or (4096 if args.quick else 16384)
    store_path = harvested_store(tokens, HOOK, str(device))
    run = WORK / f"analyze-sae-{tokens}-{width}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(
        stores=[store_path], hook=HOOK, out=str(run), width=[width], k=[32], tokens=4096, device=str(device),
        resume=False, log_every=10**9,
    )  # fmt: skip
    sae_dir = train(cfg).sae_dirs[f"topk-w{width}-k32"]
    sae = load_sae(str(sae_dir), device)
    store = open_store(store_path)

    acts = torch.from_numpy(store.activations(HOOK)[:, 1:].reshape(-1, store.d_model)).to(device).float()
    n = len(acts)
    with torch.inference_mode():
        sae.encode(acts[:4096])
        sync(device)
        t0 = time.perf_counter()
        for b in range(0, n, 4096):
            sae.encode(acts[b : b + 4096])
        sync(device)
        encoder = n / (time.perf_counter() - t0)
    del acts

    t0 = time.perf_counter()
    stats = collect_stats(store, HOOK, sae.encode, width, 20, 16, device, progress=False)
    sync(device)
    stats_pass = stats.n_tokens / (time.perf_counter() - t0)

    report = WORK / "analyze-report"
    shutil.rmtree(report, ignore_errors=True)
    t0 = time.perf_counter()
    res = analyze(
        AnalyzeConfig(sae=str(sae_dir), store=store_path, out=str(report), device=str(device)), False
    )
    sync(device)
    whole = res.n_tokens / (time.perf_counter() - t0)
    shutil.rmtree(report, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)

    print(f"encoder alone: {encoder:,.0f} tok/s over {n:,} tokens (TopK width {width})")
    print(f"stats pass:    {stats_pass:,.0f} tok/s ({stats_pass / encoder:.2f}x)")
    print(f"saepipe analyze (whole command): {whole:,.0f} tok/s ({whole / encoder:.2f}x; target >= 0.8x)")
    if not args.no_record:
        append_result(
            "analysis",
            f"default model {HOOK}, {n:,} tokens, TopK width {width}",
            f"encoder alone {encoder:,.0f} tok/s; stats pass {stats_pass:,.0f}; whole analyze {whole:,.0f}",
            f"stats pass {stats_pass / encoder:.2f}x, whole command {whole / encoder:.2f}x (target >= 0.8)",
            device=machine(args.device),
        )


if __name__ == "__main__":
    main()
