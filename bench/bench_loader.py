"""Loader headroom: tokens/s the streaming loader delivers from a store on disk vs tokens/s the trainer eats.

The loader (`saepipe.train.loader.ActivationLoader`: chunks read from Zarr, shuffled in a mixing buffer,
prefetched by a background thread, moved to the device) is timed over its first windows, start-up
included. The trainer is one TopK SAE's `sae_step` on in-memory batches. Target: loader >= 3x the trainer,
so the trainer never waits. The store is synthetic (d_model 576, float16, as harvested), built once.

    python -m bench.bench_loader [--device auto] [--quick] [--tokens 1048576] [--width 16384]
"""

from __future__ import annotations

import time

import torch

from bench.bench_train import saepipe_step
from bench.common import best_seconds, device_of, parser, record, sync, synthetic_store


def loader_rate(store: str, batch: int, buffer_tokens: int, n_batches: int, device: torch.device) -> float:
    """tokens/s over `n_batches` batches from a fresh loader (opening and the first window included)."""
    from saepipe.train.loader import ActivationLoader

    t0 = time.perf_counter()
    loader = ActivationLoader([store], "synthetic", batch, buffer_tokens, seed=0, device=device)
    stream = loader.batches()
    try:
        for _ in range(n_batches):
            next(stream)
        sync(device)
    finally:
        stream.close()
    return n_batches * batch / (time.perf_counter() - t0)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=None, help="store size (default 1,048,576; quick 131,072)")
    p.add_argument("--width", type=int, default=None, help="trainer SAE width (default 16384; quick 4096)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--buffer-tokens", type=int, default=None, help="default 262,144; quick 32,768")
    args = p.parse_args()
    device = device_of(args.device)
    tokens = args.tokens or (131_072 if args.quick else 1_048_576)
    width = args.width or (4096 if args.quick else 16384)
    buffer_tokens = args.buffer_tokens or (32_768 if args.quick else 262_144)
    store = synthetic_store(tokens)
    n_batches = tokens // args.batch  # one epoch: every window read from disk once
    delivered = loader_rate(store, args.batch, buffer_tokens, n_batches, device)
    step = saepipe_step(576, width, 32, device)
    x = torch.randn(args.batch, 576, device=device)
    consumed = args.batch / best_seconds(lambda: step(x), device, reps=2)
    ratio = delivered / consumed
    print(
        f"loader: {delivered:,.0f} tok/s over {n_batches} batches of {args.batch} (buffer {buffer_tokens:,})"
    )
    print(f"trainer (TopK width {width}, k 32): {consumed:,.0f} tok/s")
    print(f"loader / trainer: {ratio:.1f}x (target >= 3x)")
    record(
        args,
        "loader headroom",
        f"synthetic store {tokens:,} tokens fp16 d 576, batch {args.batch}, buffer {buffer_tokens:,}; "
        f"trainer TopK width {width}",
        f"loader {delivered:,.0f} tok/s; trainer {consumed:,.0f} tok/s",
        f"{ratio:.1f}x (target >= 3)",
    )


if __name__ == "__main__":
    main()
