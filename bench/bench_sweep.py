"""Width sweep from one pass: wall time of training N SAEs in one `saepipe train` vs N separate runs.

One pass reads, shuffles and ships each batch once and steps every SAE on it; N runs pay that data cost N
times (and N start-ups: opening stores, the b_dec start, saving). Both use `saepipe.train.trainer.train`
with the same settings on the same synthetic store (d_model 576, float16). Also printed: the data cost
alone (the loader over the same tokens), so the saving can be read against it. Target: one pass well
under N x one run's data cost, i.e. its wall time well under the N runs'.

    python -m bench.bench_sweep [--device auto] [--quick] [--widths 1024 2048 4096 8192] [--tokens 262144]
"""

from __future__ import annotations

import shutil
import time

from bench.bench_loader import loader_rate
from bench.common import WORK, device_of, parser, record, synthetic_store


def run(store: str, widths: list[int], tokens: int, device: str, out: str) -> float:
    """Wall seconds of one `train` call training one TopK SAE per width."""
    from saepipe.train.config import TrainConfig
    from saepipe.train.trainer import train

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        stores=[store], hook="synthetic", out=out, arch=["topk"], width=widths, k=[32], tokens=tokens,
        batch_size=4096, device=device, resume=False, log_every=10**9, checkpoint_every=10**9,
        b_dec_init="mean",
    )  # fmt: skip
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--widths", type=int, nargs="+", default=None, help="default 1024 2048 4096 8192")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default 262,144; quick 65,536)")
    args = p.parse_args()
    device = device_of(args.device)
    widths = args.widths or ([512, 1024, 2048] if args.quick else [1024, 2048, 4096, 8192])
    tokens = args.tokens or (65_536 if args.quick else 262_144)
    store = synthetic_store(tokens)
    out = str(WORK / "sweep-run")
    one_pass = run(store, widths, tokens, str(device), out)
    separate = [run(store, [w], tokens, str(device), out) for w in widths]
    data = tokens / loader_rate(store, 4096, 262_144, tokens // 4096, device)
    n, total = len(widths), sum(separate)
    ratio = one_pass / total
    print(f"one pass, {n} SAEs (widths {widths}): {one_pass:.1f} s")
    print(f"{n} separate runs: {total:.1f} s ({', '.join(f'{s:.1f}' for s in separate)})")
    print(
        f"data cost (loader alone over {tokens:,} tokens): {data:.1f} s per run; saved {total - one_pass:.1f} s"
    )
    print(f"one pass / separate runs: {ratio:.2f} (target: well under 1)")
    record(
        args,
        "width sweep, one pass",
        f"TopK k 32, widths {'/'.join(map(str, widths))}, {tokens:,} tokens, batch 4096, synthetic d 576",
        f"one pass {one_pass:.1f} s vs {n} runs {total:.1f} s; data cost {data:.1f} s per run",
        f"{ratio:.2f} of separate runs; saved {total - one_pass:.1f} s (target: well under 1)",
    )


if __name__ == "__main__":
    main()
