"""Shared bits of the benchmark scripts: devices, timing, test stores, and appending to RESULTS.md.

Every script measures the thing and its comparison in the same process, one after the other, and reports
their ratio: absolute times on shared machines drift, ratios taken within one run hold. Timings
synchronise CUDA before reading the clock, so the same scripts give GPU figures with `--device cuda`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "| date | benchmark | setting | figures | ratio | device | torch |\n|---|---|---|---|---|---|---|\n"
WORK = Path(os.environ.get("SAEPIPE_BENCH_DIR", Path(tempfile.gettempdir()) / "saepipe-bench"))
"""Where scripts keep the stores they build (reused across runs; delete it to rebuild)."""


def machine(device: str = "auto") -> str:
    if (device in ("auto", "cuda") and torch.cuda.is_available()) or device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()}, {os.cpu_count()} cores"


def append_result(name: str, setting: str, figures: str, ratio: str, device: str) -> None:
    """Append one row to the table in RESULTS.md (creating the table if absent)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if HEADER not in text:
        text += "\n" + HEADER
    date = datetime.date.today().isoformat()
    row = f"| {date} | {name} | {setting} | {figures} | {ratio} | {device} | {torch.__version__} |"
    lines = text.splitlines()
    start = lines.index(HEADER.splitlines()[0])
    end = start + next(i for i, line in enumerate([*lines[start:], ""]) if not line.startswith("|"))
    lines.insert(end, row)  # into the table, above any notes written under it
    RESULTS.write_text("\n".join(lines) + "\n")


def record(
    args: argparse.Namespace, name: str, setting: str, figures: str, ratio: str, device: str = ""
) -> None:
    """The tail every script shares: one row in RESULTS.md for what it just printed, unless --no-record
    (`device` names the device measured when it is not `--device`)."""
    if not args.no_record:
        append_result(name, setting, figures, ratio, machine(device or args.device))


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every script shares: --device and --quick."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--quick", action="store_true", help="small sizes: a minute or two on 2 CPU cores")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    return p


def device_of(name: str) -> torch.device:
    from saepipe.harvest.devices import resolve_device

    return resolve_device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, reps: int = 3, warmup: int = 1) -> float:
    """Fastest of `reps` timed calls after `warmup` untimed ones (the minimum is the least noisy figure
    on a shared machine: interference only ever adds time)."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_matmul_flops(device: torch.device, shapes: list[tuple[int, int, int]] | None = None) -> float:
    """Measured peak float32 matmul FLOP/s: the best over a few large shapes (this machine's bound)."""
    shapes = shapes or [(2048, 2048, 2048), (4096, 576, 4096)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        seconds = best_seconds(lambda a=a, b=b: a @ b, device, reps=3)
        best = max(best, 2 * m * k * n / seconds)
    return best


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def synthetic_store(tokens: int, d_model: int = 576, dtype: str = "float16") -> str:
    """Path of a complete synthetic store (`saepipe synth`) of `tokens` tokens, built once and reused.

    Used where the bench needs a store of a given size but not a model: loader, sweep and memory. The
    activations have d_model's width and the store's real layout (128-token contexts, 32-context chunks).
    """
    from saepipe.harvest.config import SynthConfig
    from saepipe.harvest.store import store_complete
    from saepipe.harvest.synthetic import generate

    out = WORK / f"synth-{tokens}-{d_model}-{dtype}"
    store = out / "store"
    if not store_complete(str(store)):
        cfg = SynthConfig(out=str(out), d_model=d_model, n_features=2 * d_model, tokens=tokens, dtype=dtype)
        generate(cfg, progress=False)
    return str(store)


def harvested_store(tokens: int, hook: str, device: str) -> str:
    """Path of a store harvested from the default model (`saepipe harvest`), built once and reused."""
    from saepipe.harvest.config import HarvestConfig
    from saepipe.harvest.harvester import harvest
    from saepipe.harvest.store import store_complete

    out = WORK / f"harvest-{tokens}-{hook}"
    if not store_complete(str(out)):
        harvest(HarvestConfig(out=str(out), hooks=[hook], tokens=tokens, device=device), progress=False)
    return str(out)


def slice_store(src: str, dst: str, start: int, stop: int) -> str:
    """A store holding contexts [start, stop) of `src` (start on `src`'s shard grid), built once and reused.

    A prefix (start 0) has the settings and bytes a harvest of that many contexts writes (packing is
    deterministic), so a big harvest yields the smaller stores of a store-size curve; any other slice
    records `slice: [start, stop]` in its dataset settings, since its contexts do not start the dataset.
    """
    from saepipe.harvest.store import StoreWriter, open_store, store_complete

    if store_complete(dst):
        return dst
    s = open_store(src)
    stop = min(stop, s.n_contexts)
    settings = {**s.settings, "n_contexts_target": stop - start}
    if start:
        settings["dataset"] = {**settings["dataset"], "slice": [start, stop]}
    w = StoreWriter(dst, settings)
    first = 1 if s.settings["prepend_bos"] else 0
    for a in range(start, stop, w.shard_contexts):
        b = min(a + w.shard_contexts, stop)
        w.write_shard(a - start, s.tokens(a, b), {h: s.activations(h, a, b) for h in s.hooks}, first)
    w.finish()
    return dst
