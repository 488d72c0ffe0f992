"""Trainer pieces: schedules, geometric median against a brute-force minimiser, config and resume refusals."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import torch
from scipy.optimize import minimize

from saepipe.cli import main
from saepipe.train.config import TrainConfig
from saepipe.train.trainer import geometric_median, lr_at, sparsity_at

HOOK = "blocks.1.hook_resid_post"


def test_schedules():
    cfg = TrainConfig(
        stores=["s"], hook="h", out="o", lr=1.0, lr_warmup=0.1, lr_decay=0.2, sparsity_warmup=0.5
    )
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[50] == 1.0
    assert all(a >= b for a, b in pairwise(lrs[80:])) and lrs[-1] == 0.05
    assert all(a <= b for a, b in pairwise(lrs[:11]))
    scales = [sparsity_at(s, 100, cfg) for s in range(100)]
    assert scales[0] == 0.02 and scales[49] == 1.0 and scales[-1] == 1.0


def test_geometric_median_minimises_the_sum_of_distances():
    rng = np.random.default_rng(0)
    pts = np.concatenate(
        [rng.normal(size=(200, 5)), rng.normal(50, 1, size=(20, 5))]
    )  # outliers pull the mean
    ours = geometric_median(torch.from_numpy(pts)).numpy()
    brute = minimize(lambda y: np.linalg.norm(pts - y, axis=1).sum(), pts.mean(0), method="Nelder-Mead",
                     options={"xatol": 1e-9, "fatol": 1e-9, "maxiter": 20000}).x  # fmt: skip
    cost = lambda y: np.linalg.norm(pts - y, axis=1).sum()  # noqa: E731
    assert cost(ours) <= cost(brute) + 1e-6
    assert np.linalg.norm(ours - pts.mean(0)) > 1.0  # not just the mean


def test_user_mistakes_are_one_line_errors(tiny_store, tmp_path, capsys):
    base = ["train", "--store", str(tiny_store), "--hook", HOOK, "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a"), "--arch", "gated"]) == 2
    assert "unknown --arch 'gated'" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--hook", "blocks.9.hook_resid_post"]) == 2
    assert "no hook" in capsys.readouterr().err
    run = [
        *base,
        "--out",
        str(tmp_path / "c"),
        "--width",
        "32",
        "--k",
        "4",
        "--tokens",
        "640",
        "--batch-size",
        "32",
    ]
    assert main(run) == 0
    assert main([*run, "--lr", "0.1"]) == 2
    assert "was started with lr=" in capsys.readouterr().err
