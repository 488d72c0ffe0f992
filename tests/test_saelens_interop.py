"""Every architecture's SAE dir loads in SAELens and encodes/decodes there exactly as in saepipe.

saepipe writes one small SAE dir per architecture with inputs and its own outputs (safetensors); the
sae-lens python of a separate virtualenv (scripts/saelens_venv.sh, called by scripts/test.sh, so CI runs
this) loads each dir with `SAE.load_from_disk` and reports its outputs' differences and the metadata it
read (scripts/saelens_check.py). Outside CI the test is skipped when no sae-lens python is given
(SAEPIPE_SAELENS_PYTHON); in CI a missing one is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saepipe.train import load_sae, save_sae
from saepipe.train.saes import ARCHITECTURES, build_sae

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"
SAELENS_CLASS = {
    "relu": "StandardSAE",
    "topk": "TopKSAE",
    "jumprelu": "JumpReLUSAE",
    "batchtopk": "JumpReLUSAE",
    "matryoshka": "JumpReLUSAE",
}
TRAINING_ARCHITECTURE = {
    "relu": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
    "matryoshka": "matryoshka_batchtopk",
}


def saelens_python() -> str:
    python = os.environ.get("SAEPIPE_SAELENS_PYTHON")
    if python and Path(python).exists():
        return python
    why = "no sae-lens python: run `bash scripts/saelens_venv.sh` and set SAEPIPE_SAELENS_PYTHON to what it prints"
    if os.environ.get("CI"):
        pytest.fail(f"{why} (scripts/test.sh does this in CI)")
    pytest.skip(why)


def write_dirs(root: Path) -> None:
    """One SAE dir per architecture, with weights that make every part of encode/decode matter."""
    torch.manual_seed(0)
    for arch in sorted(ARCHITECTURES):
        sae = build_sae(arch, 16, 48, k=6)
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_(std=0.3)
            sae.W_dec.mul_(torch.rand(48, 1) + 0.5)  # decoder rows not of unit norm
            if sae.has_threshold:
                sae.threshold.uniform_(0.05, 0.6)
        path = save_sae(
            sae, root / arch, hook_name=HOOK, model_name="tiny-llama", input_scale=1.7,
            context_size=32, prepend_bos=True, dataset_path="shakespeare",
            saepipe={"training": {"drop_bos": True}},
        )  # fmt: skip
        loaded = load_sae(path)
        x = torch.randn(64, 16) * 3
        with torch.no_grad():
            z = loaded.encode(x)
            recon = loaded.decode(z)
        save_file({"x": x, "z": z, "recon": recon}, str(path / "expected.safetensors"))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    python = saelens_python()
    root = tmp_path_factory.mktemp("saelens")
    write_dirs(root)
    out = subprocess.run(
        [python, str(REPO / "scripts" / "saelens_check.py"), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_saelens_loads_and_matches(arch, report):
    r = report["saes"][arch]
    assert r["class"] == SAELENS_CLASS[arch]
    assert 0.02 < r["active_fraction"] < 0.9, f"vacuous: {r['active_fraction']:.3f} of the code is active"
    # Same float32 arithmetic in both libraries; 1e-5 leaves room for a different matmul order.
    assert r["z_max_abs_diff"] < 1e-5 and r["recon_max_abs_diff"] < 1e-5, r
    assert r["forward_max_abs_diff"] < 1e-5, r
    meta = r["metadata"]
    assert meta["hook_name"] == HOOK and meta["hook_layer"] == 1 and meta["model_name"] == "tiny-llama"
    assert meta["model_from_pretrained_kwargs"]["center_writing_weights"] is False
    assert meta["context_size"] == 32 and meta["prepend_bos"] is True and meta["neuronpedia_id"] is None
    assert meta["training_architecture"] == TRAINING_ARCHITECTURE[arch]


def test_ci_checks_the_pinned_version(report):
    """What README says was checked is what CI loads (elsewhere any sae-lens python may be given)."""
    pinned = (REPO / "scripts" / "saelens_venv.sh").read_text().split("SAELENS_VERSION=")[1].split()[0]
    if not os.environ.get("CI") and report["sae_lens_version"] != pinned:
        pytest.skip(f"checked sae-lens {report['sae_lens_version']}, not the pinned {pinned}")
    assert report["sae_lens_version"] == pinned
