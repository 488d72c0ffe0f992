"""An SAE dir, loaded, encodes and decodes exactly as an independent numpy reading of its files says.

The reference reads sae_weights.safetensors with the safetensors library (no saepipe code) and
cfg.json with json, and implements the contract in train/sae_dir.py from scratch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from saepipe.errors import SaepipeError
from saepipe.train import load_sae, save_sae
from saepipe.train.saes import ARCHITECTURES, build_sae


def reference_encode(path, x: np.ndarray) -> np.ndarray:
    t = load_file(str(path / "sae_weights.safetensors"))
    cfg = json.loads((path / "cfg.json").read_text())
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    arch = cfg["saepipe"]["architecture"] if "architecture" in cfg["saepipe"] else cfg["architecture"]
    k = cfg["saepipe"].get("k", cfg.get("k"))
    if arch == "relu":
        return np.maximum(pre, 0)
    if arch == "topk":
        act = np.maximum(pre, 0)
        out = np.zeros_like(act)
        for i, row in enumerate(act):
            keep = np.argsort(-row, kind="stable")[:k]
            out[i, keep] = row[keep]
        return out
    assert arch in ("jumprelu", "batchtopk", "matryoshka")
    return np.where(pre > t["threshold"], pre, 0)


def reference_decode(path, z: np.ndarray) -> np.ndarray:
    t = load_file(str(path / "sae_weights.safetensors"))
    return z @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_loaded_sae_matches_independent_reimplementation(arch, tmp_path):
    torch.manual_seed(0)
    sae = build_sae(arch, 12, 40, k=5)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
        if sae.has_threshold:
            sae.threshold.uniform_(0.05, 0.6)
    scale = 2.5  # trained on x * 2.5: the saved SAE must map raw x
    out = save_sae(
        sae, tmp_path / arch, hook_name="blocks.1.hook_resid_post", model_name="tiny", input_scale=scale
    )
    loaded = load_sae(out)
    cfg = loaded.cfg
    assert cfg["saepipe"]["architecture"] == arch and cfg["d_in"] == 12 and cfg["d_sae"] == 40
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}.get(
        arch, "jumprelu"
    )  # SAELens's names
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["hook_name"] == cfg["hook_name"] and cfg["hook_layer"] == 1
    assert ("k" in cfg["saepipe"]) == (arch in ("topk", "batchtopk", "matryoshka"))
    assert ("k" in cfg) == (arch == "topk")
    tensors = load_file(str(out / "sae_weights.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {
        "W_enc": (12, 40),
        "b_enc": (40,),
        "W_dec": (40, 12),
        "b_dec": (12,),
        **({"threshold": (40,)} if sae.has_threshold else {}),
    }
    assert all(v.dtype == np.float32 for v in tensors.values())

    x = np.random.default_rng(1).normal(size=(64, 12)).astype(np.float32) * 3
    with torch.no_grad():
        z = loaded.encode(torch.from_numpy(x)).numpy()
        recon = loaded.decode(torch.from_numpy(z)).numpy()
        full = loaded(torch.from_numpy(x)).numpy()
        # folding the scale keeps the trained SAE's code and its reconstruction / scale
        z_trained = sae.encode(torch.from_numpy(x) * scale).numpy()
    z_ref = reference_encode(out, x)
    assert (z_ref != 0).sum() > 0 and (z_ref == 0).sum() > 0, "vacuous: code all zero or all active"
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z_trained, z_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(recon, reference_decode(out, z_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full, recon, rtol=1e-6, atol=1e-6)
    assert {"W_enc", "b_enc", "W_dec", "b_dec"} <= {n for n, _ in loaded.named_parameters()}


def test_load_refuses_a_non_sae_dir(tmp_path):
    with pytest.raises(SaepipeError, match="not an SAE dir"):
        load_sae(tmp_path)


def as_format_1(path) -> None:
    """Rewrite a dir's cfg.json as saepipe wrote it before SAELens interop (format version 1)."""
    cfg = json.loads((path / "cfg.json").read_text())
    own = cfg["saepipe"]
    arch, hparams = own.pop("architecture"), dict(own["hparams"])
    old = {"architecture": arch, "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "hook_name": cfg["hook_name"],
           "model_name": cfg["model_name"], "dtype": "float32"}  # fmt: skip
    if "k" in own:
        old["k"] = own.pop("k")
    if arch == "matryoshka":
        old["matryoshka_prefixes"] = hparams.pop("prefixes")
    old.update(apply_b_dec_to_input=True, normalize_activations="none")
    old["saepipe"] = {**own, "format_version": 1, "hparams": hparams}
    (path / "cfg.json").write_text(json.dumps(old))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_format_1_dirs_keep_loading(arch, tmp_path):
    """Users' SAE dirs written before format 2 load into the same model, settings included."""
    torch.manual_seed(1)
    sae = build_sae(arch, 12, 40, k=5, hparams={"prefixes": [5, 20, 40]} if arch == "matryoshka" else None)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.3)
        if sae.has_threshold:
            sae.threshold.uniform_(0.05, 0.6)
    new = load_sae(save_sae(sae, tmp_path / "new", hook_name="blocks.0.hook_resid_post", model_name="m"))
    old_path = save_sae(sae, tmp_path / "old", hook_name="blocks.0.hook_resid_post", model_name="m")
    as_format_1(old_path)
    assert json.loads((old_path / "cfg.json").read_text())["architecture"] == arch
    old = load_sae(old_path)
    assert type(old) is type(new) and old.k == new.k and old.hparams == new.hparams
    x = torch.randn(32, 12) * 3
    with torch.no_grad():
        torch.testing.assert_close(old.encode(x), new.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)


def test_load_refuses_a_saelens_name_that_disagrees(tmp_path):
    """SAELens reads the top-level architecture: one that contradicts saepipe's would load differently."""
    sae = build_sae("batchtopk", 12, 40, k=5)
    path = save_sae(sae, tmp_path / "s", hook_name="blocks.0.hook_resid_post", model_name="m")
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["architecture"] = "topk"
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaepipeError, match=r"does not match saepipe\.architecture 'batchtopk'"):
        load_sae(path)


_SAVE_LOOP = """
import sys, torch
from saepipe.train import save_sae
from saepipe.train.saes import build_sae
sae = build_sae("topk", 768, 16384, k=32)
print("ready", flush=True)
while True:
    save_sae(sae, sys.argv[1], "blocks.0.hook_resid_post", "m")
"""


def test_a_save_caught_at_any_moment_leaves_only_its_own_names(tmp_path):
    """A kill can land anywhere in a save; what it leaves must be the dir's files or `*.partial` ones (which
    the next save overwrites), never a temporary under a fresh random name that a rerun would keep."""
    import random
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sae"
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        seen: set[str] = set()
        rng = random.Random(0)
        for _ in range(40):  # each save takes ~0.1-0.3 s; 40 pauses land inside the weights write many times
            time.sleep(rng.uniform(0.01, 0.08))
            proc.send_signal(signal.SIGSTOP)
            seen |= {p.name for p in out.iterdir()} if out.exists() else set()
            proc.send_signal(signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
    allowed = {"sae_weights.safetensors", "cfg.json"}
    assert "sae_weights.safetensors.partial" in seen, "no pause landed inside a weights write"
    assert seen - allowed - {n + ".partial" for n in allowed} == set()
