"""The seed axis: `--seed 0 1` trains SAEs that differ only in their initialisation, in one pass; the first
seed's SAE is byte-identical to the one a single-seed run trains, and a single-seed run keeps its SAE dir
names and its recorded seed exactly as before the axis existed."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file

from saepipe.cli import main
from saepipe.train.config import TrainConfig

HOOK = "blocks.1.hook_resid_post"


def test_seed_axis_names_and_records():
    one = TrainConfig(stores=["s"], hook="h", out="o", width=[32, 64], k=[4])
    assert [s.name for s in one.specs()] == ["topk-w32-k4", "topk-w64-k4"]
    assert one.model_dump()["seed"] == 0  # recorded as the integer it always was
    two = TrainConfig(stores=["s"], hook="h", out="o", width=[32, 64], k=[4], seed=[0, 1], seed_widths=[32])
    assert [(s.name, s.seed) for s in two.specs()] == [
        ("topk-w32-k4", 0),
        ("topk-w64-k4", 0),
        ("topk-w32-k4-s1", 1),
    ]
    assert two.model_dump()["seed"] == [0, 1]
    assert TrainConfig(**two.model_dump()).specs() == two.specs()  # a saved config rebuilds the same run
    with pytest.raises(ValueError, match="seed-widths 48"):
        TrainConfig(stores=["s"], hook="h", out="o", width=[32], k=[4], seed=[0, 1], seed_widths=[48])
    with pytest.raises(ValueError, match="each --seed once"):
        TrainConfig(stores=["s"], hook="h", out="o", width=[32], k=[4], seed=[3, 3])


def test_two_seeds_in_one_pass(tiny_store, tmp_path):
    base = ["train", "--store", str(tiny_store), "--hook", HOOK, "--device", "cpu", "--width", "32",
            "--k", "4", "--tokens", "1280", "--batch-size", "64", "--log-every", "100"]  # fmt: skip
    assert main([*base, "--seed", "0", "1", "--out", str(tmp_path / "both")]) == 0
    assert main([*base, "--seed", "0", "--out", str(tmp_path / "one")]) == 0
    both = sorted(p.name for p in (tmp_path / "both").iterdir() if (p / "cfg.json").exists())
    assert both == ["topk-w32-k4", "topk-w32-k4-s1"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir() if (p / "cfg.json").exists()) == [
        "topk-w32-k4"
    ]

    w0 = load_file(str(tmp_path / "both" / "topk-w32-k4" / "sae_weights.safetensors"))
    w1 = load_file(str(tmp_path / "both" / "topk-w32-k4-s1" / "sae_weights.safetensors"))
    assert (abs(w0["W_dec"] - w1["W_dec"]).max()) > 1e-2, "the two seeds trained the same SAE"
    # the second seed leaves the first untouched: same bytes as the single-seed run's SAE
    single = tmp_path / "one" / "topk-w32-k4" / "sae_weights.safetensors"
    assert (tmp_path / "both" / "topk-w32-k4" / "sae_weights.safetensors").read_bytes() == single.read_bytes()

    cfg_one = json.loads((tmp_path / "one" / "topk-w32-k4" / "cfg.json").read_text())
    assert cfg_one["saepipe"]["training"]["seed"] == 0 and "seed" not in cfg_one["saepipe"]
    cfg_s1 = json.loads((tmp_path / "both" / "topk-w32-k4-s1" / "cfg.json").read_text())
    assert cfg_s1["saepipe"]["seed"] == 1 and cfg_s1["saepipe"]["training"]["seed"] == [0, 1]


def test_seeds_compose_with_budgets_and_also_grids():
    """Names carry -t<tokens> then -s<seed>; the budgets of one (arch, width, k, seed) start from the same
    weights, another seed from other weights, and the first seed's starts are a single-seed run's."""
    from saepipe.train.trainer import build_saes

    kw = dict(stores=["s"], hook="h", out="o", width=[32], k=[4], tokens=[1000, 2000])
    kw["also"] = [{"width": [64], "tokens": [2000]}]
    two = TrainConfig(**kw, seed=[0, 1], seed_widths=[32])
    assert [(s.name, s.tokens, s.seed) for s in two.specs()] == [
        ("topk-w32-k4-t1000", 1000, 0),
        ("topk-w32-k4-t2000", 2000, 0),
        ("topk-w64-k4-t2000", 2000, 0),
        ("topk-w32-k4-t1000-s1", 1000, 1),
        ("topk-w32-k4-t2000-s1", 2000, 1),
    ]
    built = build_saes(two, 16)
    single = build_saes(TrainConfig(**kw), 16)
    w = {name: sae.W_dec.detach() for name, sae in built.items()}
    assert (w["topk-w32-k4-t1000"] == w["topk-w32-k4-t2000"]).all()
    assert (w["topk-w32-k4-t1000-s1"] == w["topk-w32-k4-t2000-s1"]).all()
    assert (w["topk-w32-k4-t1000"] - w["topk-w32-k4-t1000-s1"]).abs().max() > 1e-2
    assert sorted(single) == [n for n in sorted(built) if not n.endswith("-s1")]
    for name, sae in single.items():
        assert (sae.W_dec.detach() == w[name]).all() and (
            sae.W_enc.detach() == built[name].W_enc.detach()
        ).all()
