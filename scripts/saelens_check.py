"""Load saepipe SAE dirs with SAELens and compare its encode/decode with saepipe's (run by the sae-lens venv).

    <sae-lens python> scripts/saelens_check.py ROOT

ROOT holds one SAE dir per architecture, each with `expected.safetensors` (x [n, d_in], and saepipe's
z [n, d_sae] and recon [n, d_in] for it). Prints one JSON object {dir name: report}; the report holds the
class SAELens built, the largest absolute differences, and the metadata SAEBench and Neuronpedia read.
Imports only sae_lens, torch and safetensors: it runs where saepipe is not installed.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import sae_lens
import torch
from sae_lens import SAE
from safetensors.torch import load_file


def check(path: Path) -> dict:
    with warnings.catch_warnings():
        # SAELens warns that model_from_pretrained_kwargs is non-empty: it is, on purpose (see cfg.json).
        warnings.simplefilter("ignore", UserWarning)
        sae = SAE.load_from_disk(str(path), device="cpu")
    expected = load_file(str(path / "expected.safetensors"))
    with torch.no_grad():
        z = sae.encode(expected["x"])
        recon = sae.decode(z)
        forward = sae(expected["x"])
    meta = sae.cfg.metadata
    return {
        "class": type(sae).__name__,
        "architecture": sae.cfg.architecture(),
        "z_max_abs_diff": float((z - expected["z"]).abs().max()),
        "recon_max_abs_diff": float((recon - expected["recon"]).abs().max()),
        "forward_max_abs_diff": float((forward - expected["recon"]).abs().max()),
        "active_fraction": float((z != 0).float().mean()),
        "metadata": {
            key: meta.get(key)
            for key in (
                "hook_name",
                "hook_layer",
                "model_name",
                "model_from_pretrained_kwargs",
                "neuronpedia_id",
                "context_size",
                "prepend_bos",
                "training_architecture",
            )
        },
    }


def main() -> None:
    root = Path(sys.argv[1])
    dirs = sorted(p for p in root.iterdir() if (p / "cfg.json").is_file())
    report = {"sae_lens_version": sae_lens.__version__, "saes": {p.name: check(p) for p in dirs}}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
