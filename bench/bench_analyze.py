"""Analysis: tokens/s of `saepipe analyze` vs the SAE encoder alone on the same activations.

On a store harvested from the default model (built once) with a TopK SAE trained on it briefly, this
times, in one process and back to back (encoder, stats pass, encoder, stats pass, encoder; each figure is
its best, so load that comes and goes on a shared machine does not favour either side):
- `encoder alone`: the SAE's encoder over the store's activations already in memory, batch by batch:
  `sae.encode` (dense codes, the old baseline) and `sae.encode_sparse` (what analysis uses);
- `stats pass`: the streaming pass of `saepipe analyze` (read, encode sparsely, running top-k contexts,
  the sample reservoir and the context pool for explanations, histograms;
  `saepipe.analyze.stats.collect_stats`), the part that scales with the store;
- `explanations`: explaining and scoring every latent on held-out contexts after the pass
  (`saepipe.analyze.explanations`), and its share of the whole command;
- `saepipe analyze`: the whole command (also model load, logit effects, report and dashboard, fixed costs
  that a small store makes look large).
Targets: stats pass >= 0.9x the encoder alone at width 16384; explanations <= 20% of the whole command.

    python -m bench.bench_analyze [--device auto] [--quick] [--tokens 32768] [--width 16384]
"""

from __future__ import annotations

import shutil
import time

import torch

from bench.common import WORK, device_of, harvested_store, parser, record, sync

HOOK = "blocks.3.hook_resid_post"


def main() -> None:
    from saepipe.analyze.analysis import analyze
    from saepipe.analyze.config import AnalyzeConfig
    from saepipe.analyze.explanations import explain_and_score_fast
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

    def encoder(fn) -> float:
        with torch.inference_mode():
            fn(acts[:4096])
            sync(device)
            t0 = time.perf_counter()
            for b in range(0, n, 4096):
                fn(acts[b : b + 4096])
            sync(device)
            return n / (time.perf_counter() - t0)

    def stats_pass_once():
        t0 = time.perf_counter()
        stats = collect_stats(
            store,
            HOOK,
            sae.encode_sparse,
            width,
            20,
            16,
            device,
            progress=False,
            reservoir=64,
            pool_contexts=256,
        )
        sync(device)
        return stats, stats.n_tokens / (time.perf_counter() - t0)

    # encoder, stats pass, encoder, stats pass, encoder: each side's best, so neither gets the quiet spell
    dense, sparse, stats_pass = [encoder(sae.encode)], [encoder(sae.encode_sparse)], []
    for _ in range(2):
        stats, tps = stats_pass_once()
        stats_pass.append(tps)
        dense.append(encoder(sae.encode))
        sparse.append(encoder(sae.encode_sparse))
    dense, sparse, stats_pass = max(dense), max(sparse), max(stats_pass)
    acts = None  # free it before the whole command runs
    t0 = time.perf_counter()
    explain_and_score_fast(stats, 1 if store.settings["prepend_bos"] else 0)
    explain_s = time.perf_counter() - t0

    report = WORK / "analyze-report"
    shutil.rmtree(report, ignore_errors=True)
    t0 = time.perf_counter()
    res = analyze(
        AnalyzeConfig(sae=str(sae_dir), store=store_path, out=str(report), device=str(device)), False
    )
    sync(device)
    whole_s = time.perf_counter() - t0
    whole = res.n_tokens / whole_s
    shutil.rmtree(report, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)

    share = res.explain_seconds / whole_s
    print(
        f"encoder alone: dense {dense:,.0f} tok/s, sparse {sparse:,.0f} tok/s over {n:,} tokens (TopK width {width})"
    )
    print(f"stats pass:    {stats_pass:,.0f} tok/s ({stats_pass / dense:.2f}x dense encoder, "
          f"{stats_pass / sparse:.2f}x sparse encoder; target >= 0.9x)")  # fmt: skip
    print(f"explanations:  {explain_s:.1f} s alone; in the whole command {res.explain_seconds:.1f} s of "
          f"{whole_s:.1f} s ({100 * share:.0f}%; target <= 20%); ties {res.n_tied} of {res.n_ranked} ranked")  # fmt: skip
    print(f"saepipe analyze (whole command): {whole:,.0f} tok/s ({whole / dense:.2f}x dense encoder)")
    record(
        args,
        "analysis",
        f"default model {HOOK}, {n:,} tokens, TopK width {width}",
        f"encoder alone {dense:,.0f} tok/s dense, {sparse:,.0f} sparse; stats pass {stats_pass:,.0f}; "
        f"whole analyze {whole:,.0f} ({whole_s:.1f} s, explanations {res.explain_seconds:.1f} s)",
        f"stats pass {stats_pass / dense:.2f}x dense encoder, {stats_pass / sparse:.2f}x sparse (target >= 0.9); "
        f"explanations {100 * share:.0f}% of analyze (target <= 20%)",
    )


if __name__ == "__main__":
    main()
