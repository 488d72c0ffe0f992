"""Seed stability against training tokens, store size and data treatment (issue 19).

Each point trains two SAEs that differ only in their seed (one `saepipe train --seed 0 1` pass, TopK) on
one store for a number of training tokens, then measures, on the store's ordinary positions (BOS and
special tokens left out, the same positions for every treatment):

    agreement   latents found again by the other seed at decoder |cos| > 0.7 (saepipe.analyze.stability),
                plain and weighted by firing frequency, and the random-direction baseline
    FVU, dead   mean over the two seeds; dead = never active on the measured tokens
    loss rec.   `saepipe evaluate`'s fraction of loss recovered on held-out contexts (seed 0)

Give every run the same held-out measurement: `--eval-store` (a store of text no run trained on) for
FVU, firing and dead, and `--loss-store` (the biggest training store) so loss recovered is measured on the
same text after it for every run. `bench.common.slice_store` cuts the stores from one big harvest: a
prefix is byte-identical to a harvest of that size, the tail is the held-out store.

Treatments: `raw` (only BOS dropped, as before issue 19), `special` (BOS/EOS dropped everywhere: the new
default), `outliers` (special + positions above --outlier-multiple x the median norm dropped),
`token_norm` (special + every activation scaled to one norm). Store size against training tokens: give
several stores (e.g. 131k and 2M tokens of the same corpus) and several --tokens; tokens / store size is
the number of epochs. Finished points are reused (each run dir is a resumable `saepipe train` run), so the
curve can be grown a few points at a time.

    python -m bench.bench_stability --store S [--store S2] --tokens 1048576 4194304 [--treatment raw special]
        [--width 512] [--k 32] [--batch-size 1024] [--lr 0.001] [--dead-window 262144]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import WORK, parser, record

TREATMENTS = ("raw", "special", "outliers", "token_norm")


def treatment_settings(name: str, multiple: float) -> dict:
    return {
        "raw": {"drop_special": False},
        "special": {"drop_special": True},
        "outliers": {"drop_special": True, "drop_norm_above": multiple},
        "token_norm": {"drop_special": True, "token_norm": True},
    }[name]


def train_pair(store: str, tokens: int, treatment: str, args) -> tuple[Path, float]:
    """The run dir of a two-seed run (trained now unless already complete) and its training seconds."""
    from saepipe.harvest import open_store
    from saepipe.train.config import TrainConfig
    from saepipe.train.trainer import train

    s = open_store(store)
    tag = f"{Path(store).name}-{tokens}-{treatment}-w{args.width}-k{args.k}-b{args.batch_size}-lr{args.lr:g}"
    tag += f"-dw{args.dead_window}" + (f"-m{args.outlier_multiple:g}" if treatment == "outliers" else "")
    out = WORK / "stability" / tag
    cfg = TrainConfig(
        stores=[store], hook=s.hooks[0], out=str(out), arch=["topk"], width=[args.width], k=[args.k],
        seed=[0, 1], tokens=tokens, batch_size=args.batch_size, lr=args.lr, dead_window=args.dead_window,
        device=args.device, log_every=max(1, tokens // args.batch_size // 8), checkpoint_every=2000,
        **treatment_settings(treatment, args.outlier_multiple),
    )  # fmt: skip
    timing = out / "seconds.json"
    if timing.exists():
        return out, json.loads(timing.read_text())["seconds"]
    res = train(cfg)
    timing.write_text(json.dumps({"seconds": res.seconds}))
    return out, res.seconds


def measure(run: Path, store_path: str, args) -> dict:
    """Stability, FVU and dead fraction of the run's two seeds over the first --eval-tokens ordinary
    positions of --eval-store (default: the training store), and seed 0's loss recovered on the text
    that follows --loss-store (default: the training store)."""
    from saepipe.analyze.reconstruction import ReconstructionStats, encode_stream
    from saepipe.analyze.stability import stability
    from saepipe.harvest import open_store
    from saepipe.train import load_sae

    store = open_store(args.eval_store or store_path)
    dirs = sorted(p for p in run.iterdir() if (p / "cfg.json").exists())
    saes = [load_sae(d) for d in dirs]
    fires = [None, None]
    recon = [ReconstructionStats() for _ in saes]
    drop = store.special_token_ids
    for batch in encode_stream(saes, store, store.hooks[0], 4096, args.eval_tokens, drop):
        for i, z in enumerate(batch.latents):
            f = (z > 0).sum(axis=0).A1
            fires[i] = f if fires[i] is None else fires[i] + f
            recon[i].update(batch.x, batch.recon[i], z.nnz)
    dec = [s.W_dec.detach().numpy() for s in saes]
    st = stability(dec[0], dec[1], fires[0], fires[1])
    out = {
        **st.to_dict(),
        "fvu": sum(r.fvu for r in recon) / 2,
        "dead": sum(float((f == 0).mean()) for f in fires) / 2,
        "l0": sum(r.l0 for r in recon) / 2,
    }
    if args.eval_contexts:
        from saepipe.analyze.config import EvaluateConfig
        from saepipe.analyze.evaluate import evaluate

        res = evaluate(
            EvaluateConfig(
                sae=str(dirs[0]),
                store=args.loss_store or store_path,
                contexts=args.eval_contexts,
                device=args.device,
            ),
            progress=False,
        )
        out["loss_recovered"] = res.loss_recovered
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--store", action="append", required=True, help="an activation store; repeat for several")
    p.add_argument("--tokens", type=int, nargs="+", default=[1_048_576], help="training tokens per run")
    p.add_argument("--treatment", nargs="+", choices=TREATMENTS, default=["special"])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dead-window", type=int, default=262_144, help="tokens without firing = dead (AuxK)")
    p.add_argument("--outlier-multiple", type=float, default=3.0, help="the `outliers` treatment's cut")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="tokens measured for FVU/firing/dead")
    p.add_argument("--eval-contexts", type=int, default=16, help="held-out contexts for loss recovered")
    p.add_argument(
        "--eval-store", help="store to measure FVU, firing and dead on (default: the training one)"
    )
    p.add_argument(
        "--loss-store", help="loss recovered on the text after this store (default: the training one)"
    )
    args = p.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from saepipe.harvest import open_store

    rows = []
    head = (
        "| store tokens | training tokens | epochs | treatment | agreement | weighted | random | median best cos "
        "| FVU | L0 | dead | loss recovered | train s |"
    )
    print(head + "\n" + "|---" * 13 + "|")
    for store in args.store:
        n_store = open_store(store).n_tokens
        for tokens in args.tokens:
            for treatment in args.treatment:
                run, seconds = train_pair(store, tokens, treatment, args)
                t0 = time.perf_counter()
                m = measure(run, store, args)
                row = (
                    f"| {n_store:,} | {tokens:,} | {tokens / n_store:.1f} | {treatment} | {m['agreement']:.1%} | "
                    f"{m['weighted']:.1%} | {m['baseline']:.1%} | {m['median_best_cos']:.2f} | {m['fvu']:.3f} | "
                    f"{m['l0']:.1f} | {m['dead']:.1%} | {m.get('loss_recovered', float('nan')):.3f} | {seconds:.0f} |"
                )
                print(row + f"  <- {run.name}, measured in {time.perf_counter() - t0:.0f} s", flush=True)
                rows.append((n_store, tokens, treatment, m, seconds))
    for n_store, tokens, treatment, m, seconds in rows:
        record(
            args,
            "seed stability",
            f"TopK w{args.width} k{args.k}, store {n_store:,} tok, {tokens:,} training tok, {treatment}, "
            f"batch {args.batch_size}, lr {args.lr:g}, dead window {args.dead_window:,}",
            f"agreement {m['agreement']:.1%} (weighted {m['weighted']:.1%}, random {m['baseline']:.1%}); "
            f"FVU {m['fvu']:.3f}, dead {m['dead']:.1%}, loss recovered {m.get('loss_recovered', float('nan')):.3f}; "
            f"train {seconds:.0f} s",
            f"{m['agreement'] / 0.5:.2f}x the 50% target",
        )


if __name__ == "__main__":
    main()
