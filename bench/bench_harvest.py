"""Harvest speed: `saepipe harvest` against the bare truncated forward and against SAELens's cache runner.

Targets (issue 18): harvest >= 0.95x the bare truncated forward over the same batches; >= 1.3x SAELens's
`CacheActivationsRunner` on the same model, hook, tokens and machine at <= half its bytes per token; and
>= 2x with two hooks (saepipe records both in one pass; the runner takes one hook per run, so two runs).

    python -m bench.bench_harvest [--tokens 65536] [--hook blocks.10.hook_resid_post]
        [--hook2 blocks.5.hook_resid_post] [--chunks-per-shard 8] [--repeats 3] [--saelens-python PATH]
        [--device auto] [--quick]

Each repeat also times the inline reference (`SAEPIPE_SYNC_HARVEST=1`: no packing ahead, no write behind
the forward), which shows what the overlap buys. The last shard's write can overlap nothing, so a short
run with few shards understates the harvest; `--chunks-per-shard` makes more, smaller shards.

SAELens runs in its own virtualenv (sae-lens pins transformer-lens below 4): give its python with
`--saelens-python` or $SAEPIPE_SAELENS_PYTHON (it runs bench/saelens_cache.py); without one only the
bare-forward comparison runs. Every contender gets the same contexts (saepipe's packing of the default
corpus; SAELens receives them pre-tokenized, so its tokenization is not timed, while saepipe's is), float32
compute and batches of `--batch-size` contexts; model loading is timed by neither. Each repeat runs all
contenders once, back to back, in a fixed order; the figures are medians over repeats, and each ratio is
the median of the per-repeat ratios (contenders measured minutes apart on a shared machine see
different load; within one repeat they are seconds apart). The bare pass gets one untimed warm-up batch
and the harvest none, so the ratio is conservative for the harvester.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import parser, record, sync
from saepipe.harvest import hooks as hooklib
from saepipe.harvest import open_store
from saepipe.harvest.config import HarvestConfig
from saepipe.harvest.corpus import iter_texts, pack_contexts
from saepipe.harvest.harvester import harvest
from saepipe.harvest.models import LoadedModel, load_model, local_checkpoint
from saepipe.harvest.store import disk_bytes

SAELENS_SCRIPT = Path(__file__).with_name("saelens_cache.py")


def packed_tokens(cfg: HarvestConfig, model: LoadedModel) -> np.ndarray:
    """The contexts the harvest will store: [n, context_size] int32."""
    texts = iter_texts(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column)
    n = -(-cfg.tokens // cfg.context_size)
    contexts = pack_contexts(texts, model.tokenizer, cfg.context_size, cfg.prepend_bos)
    return np.stack(list(itertools.islice(contexts, n)))


def bare_forward(model: LoadedModel, cfg: HarvestConfig, tokens: np.ndarray) -> float:
    """tokens/s of the same batches through the truncated forward with no hooks and no writes."""
    stop = hooklib.stop_layer(cfg.hooks, model.n_layers)
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
    return tokens.size / (time.perf_counter() - t0)


def saepipe_harvest(cfg: HarvestConfig, tokens: np.ndarray, work: Path) -> tuple[float, float]:
    """(tokens/s, bytes on disk per token) of one `saepipe harvest` into a fresh store."""
    out = work / "store"
    res = harvest(cfg.model_copy(update={"out": str(out)}), progress=False)
    np.testing.assert_array_equal(open_store(str(out)).tokens(), tokens)  # the contexts the others get
    per_token = disk_bytes(str(out)) / res.n_tokens
    shutil.rmtree(out)
    return res.tokens_written_now / res.seconds, per_token


def saelens_cache(python: str, model_dir: Path, tokens_file: Path, hook: str, cfg: HarvestConfig, device: str,
                  work: Path) -> tuple[float, float]:  # fmt: skip
    """(tokens/s, bytes per token) of one SAELens CacheActivationsRunner run, in its own virtualenv."""
    out = work / "saelens"
    cmd = [python, str(SAELENS_SCRIPT), "--model-dir", str(model_dir), "--tokens", str(tokens_file), "--hook", hook,
           "--out", str(out), "--batch-size", str(cfg.batch_size), "--device", device,
           "--buffer-tokens", str(cfg.contexts_per_chunk * cfg.chunks_per_shard * cfg.context_size)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"SAELens run failed:\n{proc.stderr[-3000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out)
    if got["tokens"] != tokens_file_tokens(tokens_file):
        sys.exit(f"SAELens cached {got['tokens']} tokens, not {tokens_file_tokens(tokens_file)}")
    return got["tokens"] / got["seconds"], got["bytes"] / got["tokens"]


def tokens_file_tokens(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").size)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=None, help="default 65,536 (two shards); quick 8,192")
    p.add_argument("--hook", default="blocks.10.hook_resid_post")
    p.add_argument("--hook2", default="blocks.5.hook_resid_post", help="the second hook of the two-hook run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--chunks-per-shard", type=int, default=8, help="default 8 (256-context shards, the default)"
    )
    p.add_argument("--repeats", type=int, default=None, help="default 3; quick 1")
    p.add_argument("--saelens-python", default=os.environ.get("SAEPIPE_SAELENS_PYTHON"),
                   help="python of a virtualenv with sae-lens (default $SAEPIPE_SAELENS_PYTHON)")  # fmt: skip
    args = p.parse_args()
    args.tokens = args.tokens or (8192 if args.quick else 65536)
    repeats = args.repeats or (1 if args.quick else 3)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    cfg = HarvestConfig(hooks=[args.hook], tokens=args.tokens, device=device, batch_size=args.batch_size,
                        chunks_per_shard=args.chunks_per_shard)  # fmt: skip
    two = cfg.model_copy(update={"hooks": [args.hook, args.hook2]})
    model = load_model(cfg.model, device, cfg.model_dtype)
    tokens = packed_tokens(cfg, model)
    work = Path(tempfile.mkdtemp(prefix="saepipe-bench-harvest-"))
    tokens_file = work / "tokens.npy"
    np.save(tokens_file, tokens)
    model_dir = local_checkpoint(cfg.model)
    runs: dict[str, list[float]] = {k: [] for k in ("bare", "harvest", "inline", "harvest2", "sl", "sl2")}
    ratios: dict[str, list[float]] = {k: [] for k in ("bare", "inline", "sl", "sl2")}
    bytes_pt: dict[str, float] = {}
    for r in range(repeats):
        runs["bare"].append(bare_forward(model, cfg, tokens))
        rate, bytes_pt["harvest"] = saepipe_harvest(cfg, tokens, work)
        runs["harvest"].append(rate)
        ratios["bare"].append(rate / runs["bare"][-1])
        os.environ["SAEPIPE_SYNC_HARVEST"] = "1"  # the inline reference: no packing ahead, no writes behind
        try:
            runs["inline"].append(saepipe_harvest(cfg, tokens, work)[0])
        finally:
            del os.environ["SAEPIPE_SYNC_HARVEST"]
        ratios["inline"].append(runs["inline"][-1] / runs["bare"][-1])
        line = f"repeat {r + 1}: bare {runs['bare'][-1]:,.0f} tok/s, harvest {rate:,.0f}, inline {runs['inline'][-1]:,.0f}"
        if args.saelens_python:
            sl, bytes_pt["sl"] = saelens_cache(
                args.saelens_python, model_dir, tokens_file, args.hook, cfg, device, work
            )
            rate2, bytes_pt["harvest2"] = saepipe_harvest(two, tokens, work)
            sl_b, _ = saelens_cache(
                args.saelens_python, model_dir, tokens_file, args.hook2, cfg, device, work
            )
            sl2 = 1 / (1 / sl + 1 / sl_b)  # the two runs, one after the other, over the same tokens
            runs["sl"].append(sl)
            runs["harvest2"].append(rate2)
            runs["sl2"].append(sl2)
            ratios["sl"].append(rate / sl)
            ratios["sl2"].append(rate2 / sl2)
            line += f", SAELens {sl:,.0f}; two hooks: harvest {rate2:,.0f}, SAELens {sl2:,.0f}"
        print(line, flush=True)
    shutil.rmtree(work)

    def spread(key: str) -> str:
        return f"{min(ratios[key]):.2f}-{max(ratios[key]):.2f}"

    shard = cfg.contexts_per_chunk * cfg.chunks_per_shard
    setting = (f"SmolLM2-135M {args.hook}, context {cfg.context_size}, {args.tokens:,} tokens, batch {args.batch_size}, "
               f"{shard}-context shards, fp32")  # fmt: skip
    bare, rate = median(runs["bare"]), median(runs["harvest"])
    ideal = model.d_model * 2
    inline = median(runs["inline"])
    print(f"bare forward {bare:,.0f} tok/s; harvest {rate:,.0f} tok/s; ratio {median(ratios['bare']):.3f} "
          f"(target >= 0.95; {repeats} repeats, medians); inline reference (SAEPIPE_SYNC_HARVEST=1) {inline:,.0f} "
          f"tok/s, {median(ratios['inline']):.3f}x; disk {bytes_pt['harvest']:,.0f} B/token "
          f"({bytes_pt['harvest'] / ideal:.3f}x d_model x 2)")  # fmt: skip
    rows = [("harvest vs bare forward", setting,
             f"harvest {rate:,.0f} tok/s vs bare {bare:,.0f}; inline reference {inline:,.0f}",
             f"{median(ratios['bare']):.3f}x (per repeat {spread('bare')}; target >= 0.95; inline "
             f"{median(ratios['inline']):.3f}x); "
             f"{repeats} repeats, medians")]  # fmt: skip
    if args.saelens_python:
        sl, sl2, rate2 = median(runs["sl"]), median(runs["sl2"]), median(runs["harvest2"])
        size = bytes_pt["harvest"] / bytes_pt["sl"]
        print(f"SAELens cache runner {sl:,.0f} tok/s, {bytes_pt['sl']:,.0f} B/token; saepipe {median(ratios['sl']):.2f}x "
              f"its speed (target >= 1.3) at {size:.3f}x its bytes per token (target <= 0.5)")  # fmt: skip
        print(f"two hooks ({args.hook} + {args.hook2}): saepipe {rate2:,.0f} tok/s, SAELens {sl2:,.0f} tok/s "
              f"(two runs); {median(ratios['sl2']):.2f}x (target >= 2)")  # fmt: skip
        rows.append(("harvest vs SAELens cache runner", setting,
                     f"saepipe {rate:,.0f} tok/s, {bytes_pt['harvest']:,.0f} B/token (fp16 Zarr); SAELens "
                     f"{sl:,.0f} tok/s, {bytes_pt['sl']:,.0f} B/token (fp32 Arrow)",
                     f"{median(ratios['sl']):.2f}x speed (per repeat {spread('sl')}; target >= 1.3), {size:.3f}x bytes (target <= 0.5)"))  # fmt: skip
        rows.append(("harvest vs SAELens, two hooks", f"{setting}; + {args.hook2}",
                     f"saepipe one pass {rate2:,.0f} tok/s; SAELens two runs {sl2:,.0f} tok/s",
                     f"{median(ratios['sl2']):.2f}x (per repeat {spread('sl2')}; target >= 2)"))  # fmt: skip
    for row in rows:
        record(args, *row, device=device)


if __name__ == "__main__":
    main()
