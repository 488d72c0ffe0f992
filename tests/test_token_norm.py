"""Per-token normalisation (`--token-norm`, SAELens's constant_norm_rescale): scaling a token to norm sqrt(d)
and back returns it exactly; an SAE dir trained with it says so in cfg.json, and `load_sae` encodes and
decodes raw activations exactly as an independent numpy reading of the files plus the SAELens rule does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from test_train_sae_dir import reference_encode

from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.train import load_sae
from saepipe.train.token_norm import token_factor

HOOK = "blocks.1.hook_resid_post"


def test_scaling_round_trips_exactly():
    x = torch.randn(500, 64, dtype=torch.float32) * torch.logspace(-2, 3, 500)[:, None]
    f = token_factor(x)
    scaled = (x.double() * f).float()
    np.testing.assert_allclose(scaled.norm(dim=-1).numpy(), 8.0, rtol=1e-6)
    assert torch.equal((scaled.double() * 0 + x.double() * f).div(f).float(), x)  # float64 undoes it exactly


@pytest.fixture(scope="module")
def token_norm_dir(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("token_norm") / "run"
    args = ["train", "--store", str(tiny_store), "--hook", HOOK, "--device", "cpu", "--width", "48", "--k", "6",
            "--tokens", "2560", "--batch-size", "64", "--token-norm", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out / "topk-w48-k6"


def test_loaded_dir_normalises_raw_activations(token_norm_dir, tiny_store):
    cfg = json.loads((token_norm_dir / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "constant_norm_rescale" and cfg["saepipe"]["input_scale"] == 1.0
    sae = load_sae(token_norm_dir)
    x = open_store(str(tiny_store)).activations(HOOK, 0, 4)[:, 1:].reshape(-1, 64).astype(np.float32)
    # the reference: SAELens's rule by hand, then the plain SAE dir contract read with numpy
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    factor = np.sqrt(64) / norms
    z_ref = reference_encode(token_norm_dir, (x * factor).astype(np.float32))
    t = load_file(str(token_norm_dir / "sae_weights.safetensors"))
    recon_ref = (z_ref @ t["W_dec"] + t["b_dec"]) / factor
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x))
        recon = sae.decode(z)
        with pytest.raises(RuntimeError, match="call encode on them first"):
            sae.decode(z)  # the factors were used up by the decode above
        again = sae(torch.from_numpy(x))
        z_scaled = sae.encode(torch.from_numpy(x) * 37.0)  # one norm in, whatever the raw scale
    assert (z_ref > 0).sum() > 0
    np.testing.assert_allclose(z.numpy(), z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(recon.numpy(), recon_ref, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(again.numpy(), recon.numpy())
    np.testing.assert_allclose(z_scaled.numpy(), z.numpy(), rtol=1e-4, atol=1e-4)
    fvu = ((recon.numpy() - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 0.9, "the trained SAE reconstructs nothing in raw units"


def test_evaluate_splices_in_raw_units(token_norm_dir):
    from saepipe.analyze.config import EvaluateConfig
    from saepipe.analyze.evaluate import evaluate

    r = evaluate(
        EvaluateConfig(sae=str(token_norm_dir), contexts=4, batch_size=4, device="cpu"), progress=False
    )
    assert r.fvu < 0.9 and 0 < r.l0 <= 6
