"""SIGKILL each stage at many points (more than 20 per stage), rerun, and end exactly where an uninterrupted
run ends: harvest byte-identical, training with the same weights (CPU, fixed seed), analysis the same report.

Each run is a real separate process running `saepipe.cli.main`, killed with SIGKILL at increasing progress
points (committed contexts, checkpoint steps, report files) and at random short delays. To keep ~60 kills
fast, processes fork from a forkserver that has already imported torch and saepipe (a fresh interpreter
would cost 3-5 s each); the forkserver itself never runs a model, so forking it is safe.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from helpers import assert_same_weights, committed, tree_digest

H1 = "blocks.1.hook_resid_post"
_CTX = None


def _child(argv: list[str]) -> None:
    import sys

    import torch

    from saepipe.cli import main

    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process ends with it)
    # One thread, as in tests/test_train_e2e.py (and it keeps ~60 processes from fighting over 2 cores).
    torch.set_num_threads(1)

    os._exit(main(argv))


def _ctx():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "transformers", "transformers.models.llama.modeling_llama",
                                     "transformer_lens", "datasets", "zarr", "saepipe.cli",
                                     "saepipe.harvest.harvester", "saepipe.train.trainer",
                                     "saepipe.analyze.analysis"])  # fmt: skip
    return _CTX


def start(argv: list[str]) -> mp.Process:
    os.environ.setdefault("WANDB_MODE", "disabled")
    p = _ctx().Process(target=_child, args=(argv,))
    p.start()
    return p


def run_to_end(argv: list[str]) -> None:
    p = start(argv)
    p.join(300)
    assert p.exitcode == 0, f"{argv[0]} exited {p.exitcode}"


def kill_at(argv: list[str], ready: Callable[[], bool], delay: float = 0.0, timeout: float = 60) -> bool:
    """Start `argv`, SIGKILL it once `ready()` holds (then after `delay` s); False if it finished first."""
    p = start(argv)
    deadline = time.monotonic() + timeout
    while p.is_alive() and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    if delay:
        time.sleep(delay)
    if not p.is_alive():
        p.join()
        return False
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert p.exitcode == -signal.SIGKILL
    return True


def test_harvest_killed_many_times_ends_byte_identical(tmp_path, tiny_model_dir, small_corpus):
    def argv(out: Path) -> list[str]:
        return ["harvest", "--model", str(tiny_model_dir), "--dataset", str(small_corpus), "--hook", H1,
                "--tokens", str(200 * 32), "--context-size", "32", "--batch-size", "2", "--contexts-per-chunk", "2",
                "--chunks-per-shard", "2", "--dtype", "float16", "--out", str(out)]  # fmt: skip

    ref, out = tmp_path / "ref", tmp_path / "killed"
    run_to_end(argv(ref))
    rng = random.Random(0)
    kills, points = 0, []
    for i in range(22):
        # alternate: a progress threshold (kill right after a commit, or a little into the next shard), and
        # a random delay after start (model loading, packing, mid-write)
        if i % 2 == 0:
            target = min(committed(out) + rng.choice([4, 8, 12]), 196)
            ok = kill_at(
                argv(out), lambda t=target: committed(out) >= t, delay=rng.choice([0, 0, 0.003, 0.01])
            )
        else:
            ok = kill_at(argv(out), lambda: True, delay=rng.uniform(0.05, 1.0))
        kills += ok
        points.append(committed(out))
        assert committed(out) < 200 or not ok
    assert kills >= 20, points
    assert len(set(points)) >= 8, f"kill points not varied: {points}"
    run_to_end(argv(out))
    assert committed(out) == 200
    assert tree_digest(out) == tree_digest(ref)
    assert not Path(str(out) + ".lock").exists()


def test_train_killed_many_times_ends_with_the_same_weights(tmp_path, tiny_store):
    def argv(out: Path) -> list[str]:
        return ["train", "--store", str(tiny_store), "--hook", H1, "--arch", "topk", "--arch", "jumprelu",
                "--width", "64", "--k", "4", "--tokens", str(64 * 600), "--batch-size", "64",
                "--buffer-tokens", "300", "--checkpoint-every", "8", "--log-every", "50", "--device", "cpu",
                "--out", str(out)]  # fmt: skip

    def step(out: Path) -> int:
        try:
            return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    ref, out = tmp_path / "ref", tmp_path / "killed"
    run_to_end(argv(ref))
    rng = random.Random(1)
    kills, points, attempts = 0, [], 0
    while kills < 20 and attempts < 40:
        i, attempts = attempts, attempts + 1
        if i % 4 == 3:  # early: imports, store opening, b_dec start, the first steps
            ok = kill_at(argv(out), lambda: True, delay=rng.uniform(0.02, 0.3))
        else:  # a few steps after the next checkpoint, or during it
            target = min(step(out) + rng.choice([4, 8, 12]), 592)
            ok = kill_at(argv(out), lambda t=target: step(out) >= t, delay=rng.choice([0, 0.002, 0.01, 0.03]))
        kills += ok
        points.append(step(out))
        if not ok:  # a loaded machine let it finish first: start over, or every later run is a no-op
            shutil.rmtree(out)
    assert kills >= 20, f"{kills} of {attempts} kills landed; points {points}"
    assert len(set(points)) >= 8, f"kill points not varied: {points}"
    run_to_end(argv(out))
    assert_same_weights(out, ref, ("topk-w64-k4", "jumprelu-w64"))


def test_analyze_killed_many_times_ends_with_the_same_report(tmp_path, tiny_store):
    run = tmp_path / "run"
    run_to_end(["train", "--store", str(tiny_store), "--hook", H1, "--width", "256", "--k", "8",
                "--tokens", str(64 * 20), "--batch-size", "64", "--device", "cpu", "--out", str(run)])  # fmt: skip

    def argv(out: Path) -> list[str]:  # no --store: the store recorded in the SAE's cfg.json
        return ["analyze", "--sae", str(run / "topk-w256-k8"), "--device", "cpu", "--batch-tokens", "62",
                "--out", str(out)]  # fmt: skip

    ref, out = tmp_path / "ref", tmp_path / "killed"
    t0 = time.monotonic()
    run_to_end(argv(ref))
    duration = time.monotonic() - t0
    files = [
        "latents.parquet",
        "arrays.safetensors",
        "vocab.json",
        "report.json",
        "data/index.js",
        "index.html",
    ]
    rng = random.Random(2)
    seen = set()
    # Three chains, each from nothing: a chain's kills only move forward (every rerun resumes), so one chain
    # whose first kill lands late would never see the early kill points. Each chain ends with a rerun that
    # must give the reference report byte for byte. Kill times depend on the machine's load, so up to three
    # more chains run while fewer than four distinct kill points have been seen.
    chain = 0
    while chain < 3 or (len(seen) < 4 and chain < 6):
        shutil.rmtree(out, ignore_errors=True)
        landed, attempts = 0, 0
        # A kill that comes too late lets the run finish: keep trying until 7 kills of this chain have landed.
        # The first (reference) run is the slowest, so delays stay well inside it.
        while landed < 7 and attempts < 25:
            if attempts % 3 == 0:  # right after one of the report's files appears
                name = files[(chain + attempts // 3) % len(files)]
                ok = kill_at(argv(out), lambda n=name: (out / n).exists(), delay=rng.choice([0, 0.005]))
            else:
                ok = kill_at(argv(out), lambda: True, delay=rng.uniform(0.02, 0.5 * duration))
            landed += ok
            attempts += 1
            if not ok:  # it finished: start again from nothing, or every later run is a quick no-op
                shutil.rmtree(out)
            seen.add(tuple(sorted(p.name for p in out.rglob("*"))) if out.exists() else ())
        assert landed >= 7, f"chain {chain}: {landed} of {attempts} kills landed before the run finished"
        run_to_end(argv(out))
        assert tree_digest(out) == tree_digest(ref), f"chain {chain} ended with a different report"
        chain += 1
    assert len(seen) >= 4, f"kill points not varied: {seen}"
