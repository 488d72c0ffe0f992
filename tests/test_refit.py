"""`saepipe refit`: a trained TopK SAE refit with pursuit codes, written as an SAE dir every stage reads."""

import json
from pathlib import Path

import numpy as np
import pytest

from saepipe.analyze.recovery import cosine_matrix
from saepipe.cli import main
from saepipe.harvest.config import SynthConfig
from saepipe.harvest.synthetic import generate, open_truth
from saepipe.train import load_sae
from tests.helpers import one_line, tree_digest, write_relu_sae


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic set (64 features in 16 dims, 3 active per token on average) and a TopK SAE trained on it."""
    root = tmp_path_factory.mktemp("refit")
    cfg = SynthConfig(
        out=str(root / "set"), n_features=64, d_model=16, tokens=16384, context_size=32, freq_max=0.2,
        freq_min=0.02, n_parents=0,
    )  # fmt: skip
    generate(cfg, progress=False)
    argv = ["train", "--store", str(root / "set" / "store"), "--hook", "synthetic", "--out", str(root / "run"),
            "--arch", "topk", "--width", "64", "--k", "3", "--tokens", "16384", "--batch-size", "256",
            "--lr", "0.003", "--wandb", "disabled"]  # fmt: skip
    assert main(argv) == 0
    return root / "set", root / "run" / "topk-w64-k3"


def refit(sae: Path, out: Path) -> int:
    argv = ["refit", "--sae", str(sae), "--out", str(out), "--tokens", "8192", "--iterations", "5",
            "--encoder-steps", "300", "--batch-tokens", "2048"]  # fmt: skip
    return main(argv)


def mean_best_cos(directions: np.ndarray, sae_dir: Path) -> float:
    return float(np.abs(cosine_matrix(directions, load_sae(sae_dir).W_dec.detach().numpy())).max(1).mean())


def test_refit_dir_is_a_topk_sae_with_its_source_recorded_and_directions_nearer_the_truth(trained, tmp_path):
    truth_dir, sae = trained
    out = tmp_path / "refit"
    assert refit(sae, out) == 0
    got, source = load_sae(out), load_sae(sae)
    assert got.architecture == "topk" and got.k == 3 and got.d_sae == 64
    record = got.cfg["saepipe"]["pursuit_refit"]
    assert record["from"] == str(sae) and record["iterations"] == 5 and record["tokens"] == 8192
    assert record["pursuit_fvu"][-1] < record["pursuit_fvu"][0]
    assert got.cfg["saepipe"]["store"] == source.cfg["saepipe"]["store"]  # later stages accept the same store
    directions = open_truth(truth_dir).directions
    assert mean_best_cos(directions, out) > mean_best_cos(directions, sae)


def test_rerun_writes_the_same_bytes_even_over_an_interrupted_refit(trained, tmp_path):
    _, sae = trained
    assert refit(sae, tmp_path / "a") == 0
    # what a refit killed after the weights and before cfg.json leaves: weights (here garbage), no config
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "sae_weights.safetensors").write_bytes(b"half")
    assert refit(sae, tmp_path / "b") == 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_an_sae_without_topk_inference_is_refused_in_one_line(trained, tmp_path, capsys):
    truth_dir, _ = trained
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 8)).astype(np.float32)
    relu = write_relu_sae(
        tmp_path / "relu", truth_dir / "store", "synthetic", W, np.zeros(8), W.T, np.zeros(16)
    )
    line = one_line(["refit", "--sae", str(relu), "--out", str(tmp_path / "out")], capsys)
    assert "does not encode by TopK" in line
    assert not (tmp_path / "out").exists()


def test_an_out_dir_holding_something_else_is_refused(trained, tmp_path, capsys):
    _, sae = trained
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    line = one_line(["refit", "--sae", str(sae), "--out", str(tmp_path / "out")], capsys)
    assert "is not an SAE dir" in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_a_model_store_is_fit_without_its_bos_and_special_positions(tiny_store, tmp_path):
    from saepipe.harvest.store import open_store

    store = open_store(str(tiny_store))
    hook = "blocks.1.hook_resid_post"
    rng = np.random.default_rng(0)
    W = rng.standard_normal((store.d_model, 32)).astype(np.float32)
    sae = write_relu_sae(tmp_path / "sae", tiny_store, hook, W, np.zeros(32), W.T, np.zeros(store.d_model))
    cfg = json.loads((sae / "cfg.json").read_text())
    (sae / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk", "k": 4}))
    out = tmp_path / "refit"
    argv = ["refit", "--sae", str(sae), "--out", str(out), "--tokens", "640", "--iterations", "2",
            "--encoder-steps", "10"]  # fmt: skip
    assert main(argv) == 0
    tokens = store.tokens(0, 640 // store.context_size)
    kept = np.ones(tokens.shape, dtype=bool)
    kept[:, : store.info.first_position] = False
    kept &= ~np.isin(tokens, store.special_token_ids)
    assert 0 < kept.sum() < tokens.size  # the store has BOS positions to drop
    assert load_sae(out).cfg["saepipe"]["pursuit_refit"]["tokens"] == int(kept.sum())
