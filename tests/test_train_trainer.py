"""Trainer pieces: schedules, geometric median against a brute-force minimiser, config and resume refusals."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import torch
from safetensors.numpy import load_file
from scipy.optimize import minimize

from saepipe.cli import main
from saepipe.train.config import TrainConfig
from saepipe.train.trainer import geometric_median, k_at, lr_at, sparsity_at, token_warmup_at

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


def test_lr_scales_with_the_square_root_of_the_width_ratio():
    """With lr_reference_width R, an SAE of width W trains at lr * sqrt(R / W) through the whole schedule."""
    plain = TrainConfig(stores=["s"], hook="h", out="o", lr=0.02, lr_warmup=0.1, lr_decay=0.2)
    ladder = plain.model_copy(update={"lr_reference_width": 512})
    for width, ratio in ((512, 1.0), (2048, 0.5), (128, 2.0)):
        for s in range(100):
            assert np.isclose(lr_at(s, 100, ladder, width), ratio * lr_at(s, 100, plain, width))
    assert lr_at(50, 100, ladder) == lr_at(50, 100, plain) == 0.02  # no width: the run's own schedule


def test_k_anneal_falls_linearly_to_k_then_stops():
    cfg = TrainConfig(stores=["s"], hook="h", out="o", k_anneal=0.5, k_anneal_start=4.0)
    ks = [k_at(s, 100, cfg, 10, 2048) for s in range(100)]
    assert ks[0] == 40 and ks[25] == round(10 * (4 - 3 * 0.5)) and all(a >= b for a, b in pairwise(ks[:50]))
    assert ks[50:] == [None] * 50  # past the anneal the SAE's own k applies (inference always uses it)
    assert k_at(0, 100, cfg, 1000, 2048) == 2048  # never above the width
    assert k_at(0, 100, TrainConfig(stores=["s"], hook="h", out="o"), 10, 2048) is None


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


def test_budgets_from_one_pass_equal_separate_runs(tiny_store, tmp_path):
    """`--tokens A B` trains each SAE at both budgets from one pass: the budget-A SAE is exactly the SAE a
    run with `--tokens A` alone gives (same start, same first part of the stream, its own schedule)."""
    base = ["train", "--store", str(tiny_store), "--hook", HOOK, "--device", "cpu", "--arch", "topk"]
    base += ["--arch", "batchtopk", "--width", "32", "--k", "4", "--batch-size", "32", "--lr", "3e-3"]
    assert main([*base, "--out", str(tmp_path / "both"), "--tokens", "960", "2560"]) == 0
    assert main([*base, "--out", str(tmp_path / "short"), "--tokens", "960"]) == 0
    for arch in ("topk", "batchtopk"):
        both = load_file(str(tmp_path / "both" / f"{arch}-w32-k4-t960" / "sae_weights.safetensors"))
        alone = load_file(str(tmp_path / "short" / f"{arch}-w32-k4" / "sae_weights.safetensors"))
        assert both.keys() == alone.keys()
        for name in both:
            np.testing.assert_array_equal(both[name], alone[name])
        longer = load_file(str(tmp_path / "both" / f"{arch}-w32-k4-t2560" / "sae_weights.safetensors"))
        assert not np.array_equal(longer["W_dec"], both["W_dec"])  # the longer budget kept training


def test_dead_window_scales_with_the_run_and_never_exceeds_it(tiny_store, tmp_path, capsys):
    cfg = TrainConfig(stores=["s"], hook="h", out="o", tokens=[2_000_000, 400_000_000])
    assert cfg.resolved_dead_window(2_000_000) == 100_000 and cfg.resolved_dead_window(400_000_000) == 10**7
    base = [
        "train",
        "--store",
        str(tiny_store),
        "--hook",
        HOOK,
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main([*base, "--tokens", "640", "--dead-window", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not shorter than the run" in err and not (tmp_path / "x").exists()


def test_matryoshka_settings_reach_only_matryoshka_saes():
    cfg = TrainConfig(stores=["s"], hook="h", out="o", arch=["matryoshka", "topk"], width=[64, 128],
                      matryoshka_prefixes=[0.25, 1], matryoshka_selection="token")  # fmt: skip
    specs = {s.name: s.hparams for s in cfg.specs()}
    assert specs["matryoshka-w64-k32"]["prefixes"] == [16, 64]
    assert specs["matryoshka-w128-k32"]["prefixes"] == [32, 128]
    assert specs["matryoshka-w64-k32"]["selection"] == "token"
    assert "selection" not in specs["topk-w64-k32"] and "prefixes" not in specs["topk-w64-k32"]


def test_token_selection_warmup_covers_its_fraction_of_each_budget():
    cfg = TrainConfig(stores=["s"], hook="h", out="o", token_selection_warmup=0.75)
    assert [token_warmup_at(s, 100, cfg) for s in range(100)] == [True] * 75 + [False] * 25
    assert sum(token_warmup_at(s, 8, cfg) for s in range(8)) == 6  # per SAE budget, not the longest one
    off = TrainConfig(stores=["s"], hook="h", out="o")
    assert not any(token_warmup_at(s, 100, off) for s in range(100))
