"""Harvest overhead: `saepipe harvest` tokens/s vs a bare truncated forward over the same batches.

Target: harvest >= 0.95x the bare pass (hooks, dtype checks and Zarr writes should be nearly free).
Also bytes on disk per token vs d_model x itemsize. Prints figures and appends a row to bench/RESULTS.md.

    python -m bench.bench_harvest [--tokens 32768] [--hook blocks.3.hook_resid_post] [--device auto] [--quick]

The bare pass runs once untimed (warm-up: first-call allocations and kernel selection would otherwise
count against it), then before and after the harvest; the faster of the two counts, so the ratio is
conservative for the harvester.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import append_result, machine, parser, sync
from saepipe.harvest import hooks as hooklib
from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.corpus import iter_texts, pack_contexts
from saepipe.harvest.harvester import harvest
from saepipe.harvest.models import load_model
from saepipe.harvest.store import disk_bytes


def bare_forward(cfg: HarvestConfig) -> float:
    """tokens/s of the same batches through the truncated forward with no hooks and no writes."""
    model = load_model(cfg.model, cfg.device, cfg.model_dtype)
    stop = hooklib.stop_layer(cfg.hooks, model.n_layers)
    texts = iter_texts(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column)
    n = -(-cfg.tokens // cfg.context_size)
    tokens = np.stack(
        list(itertools.islice(pack_contexts(texts, model.tokenizer, cfg.context_size, True), n))
    )
    device = next(model.bridge.original_model.parameters()).device

    @torch.inference_mode()
    def forward(batches: range) -> None:
        for b in batches:
            batch = torch.from_numpy(tokens[b : b + cfg.batch_size]).long().to(device)
            model.bridge(batch, return_type=None, stop_at_layer=stop)

    forward(range(0, cfg.batch_size, cfg.batch_size))  # warm-up
    sync(device)
    t0 = time.perf_counter()
    forward(range(0, len(tokens), cfg.batch_size))
    sync(device)
    return len(tokens) * cfg.context_size / (time.perf_counter() - t0)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=None, help="default 32,768; quick 8,192")
    p.add_argument("--hook", default="blocks.3.hook_resid_post")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    args.tokens = args.tokens or (8192 if args.quick else 32768)
    tmp = Path(tempfile.mkdtemp())
    cfg = HarvestConfig(out=str(tmp / "store"), hooks=[args.hook], tokens=args.tokens, device=args.device,
                        batch_size=args.batch_size)  # fmt: skip
    bare_before = bare_forward(cfg)
    res = harvest(cfg, progress=False)
    bare = max(bare_before, bare_forward(cfg))
    rate = res.tokens_written_now / res.seconds
    per_token = disk_bytes(cfg.out) / res.n_tokens
    ideal = 576 * 2
    shutil.rmtree(tmp)
    print(
        f"bare forward: {bare:,.0f} tok/s; harvest: {rate:,.0f} tok/s; ratio {rate / bare:.3f} (target >= 0.95)"
    )
    print(f"disk: {per_token:,.1f} bytes/token vs d_model x itemsize = {ideal} ({per_token / ideal:.3f}x)")
    if args.no_record:
        return
    append_result(
        "harvest overhead",
        f"{args.hook}, {args.tokens} tokens, batch {args.batch_size}",
        f"harvest {rate:,.0f} tok/s vs bare {bare:,.0f} tok/s",
        f"{rate / bare:.3f}x (target >= 0.95); disk {per_token / ideal:.3f}x of d_model x itemsize",
        device=machine(cfg.device),
    )


if __name__ == "__main__":
    main()
