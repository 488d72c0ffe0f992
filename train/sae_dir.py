"""The SAE dir: what the train stage writes and every later stage reads. This module is its contract.

Layout (saepipe SAE dir, format version 1; the layout SAELens reads):

    sae_weights.safetensors   float32 tensors
        W_enc      [d_in, d_sae]
        b_enc      [d_sae]
        W_dec      [d_sae, d_in]
        b_dec      [d_in]
        threshold  [d_sae]        only for jumprelu, batchtopk and matryoshka
    cfg.json
        architecture            "relu" | "topk" | "batchtopk" | "jumprelu" | "matryoshka"
        d_in, d_sae, hook_name, model_name, dtype ("float32")
        k                       topk, batchtopk, matryoshka (batchtopk/matryoshka: the training batch L0)
        matryoshka_prefixes     matryoshka: the nested dictionary sizes
        apply_b_dec_to_input    true
        normalize_activations   "none" (a dataset-wide training scale is folded into the weights), or
                                "constant_norm_rescale" (trained on per-token normalised inputs,
                                saepipe.train.token_norm: applied by encode, undone by decode)
        context_size, prepend_bos, dataset_path   when known
        saepipe                 {format_version, hparams (architecture settings), input_scale (the
                                 folded normalisation factor), store {path, model_fingerprint, hook, ...},
                                 training {the resolved training settings}}

Semantics, for raw activations x [..., d_in]:
    pre = (x - b_dec) @ W_enc + b_enc
    relu: relu(pre); topk: the k largest of relu(pre) per token, others 0;
    jumprelu, batchtopk, matryoshka: pre * (pre > threshold)
    decode(z) = z @ W_dec + b_dec

If training scaled inputs by s (x_n = s x), the saved weights map raw activations: W_enc * s, W_dec / s,
b_dec / s (b_enc and threshold unchanged), which gives the same code and reconstruction / s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saepipe.errors import SaepipeError
from saepipe.train import token_norm
from saepipe.train.saes import ARCHITECTURES, SAE, build_sae

WEIGHTS = "sae_weights.safetensors"
CFG = "cfg.json"
FORMAT_VERSION = 1


def sae_tensors(sae: SAE, input_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The SAE dir's tensors (float32, CPU, contiguous), with the input scale folded in."""
    s = float(input_scale)
    tensors = {
        "W_enc": sae.W_enc.detach() * s,
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach() / s,
        "b_dec": sae.b_dec.detach() / s,
    }
    if sae.has_threshold:
        tensors["threshold"] = sae.threshold.detach()
    return {name: t.float().cpu().contiguous().clone() for name, t in tensors.items()}


def sae_cfg(sae: SAE, hook_name: str, model_name: str, input_scale: float = 1.0, **extra: Any) -> dict:
    """cfg.json for `sae`; `extra` adds top-level keys (context_size, ...) and saepipe's own sections."""
    own = extra.pop("saepipe", {})
    cfg = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "hook_name": hook_name,
        "model_name": model_name,
        "dtype": "float32",
        **sae.cfg_fields(),
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        **extra,
        "saepipe": {
            "format_version": FORMAT_VERSION,
            "hparams": sae.hparams,
            "input_scale": float(input_scale),
            **own,
        },
    }
    return cfg


def save_sae(
    sae: SAE, path: str | Path, hook_name: str, model_name: str, input_scale: float = 1.0, **extra: Any
) -> Path:
    """Write an SAE dir; each file is written to a temporary name and renamed, config last."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = sae_cfg(sae, hook_name, model_name, input_scale, **extra)
    tmp = path / (WEIGHTS + ".partial")
    save_file(sae_tensors(sae, input_scale), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS)
    tmp = path / (CFG + ".partial")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, path / CFG)
    return path


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE dir as an `SAE` module (`.cfg` holds cfg.json) with encode/decode/forward."""
    path = Path(path)
    if not (path / CFG).is_file() or not (path / WEIGHTS).is_file():
        raise SaepipeError(
            f"{path} is not an SAE dir (needs {CFG} and {WEIGHTS}); give a `saepipe train` output"
        )
    try:
        cfg = json.loads((path / CFG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaepipeError(
            f"{path}/{CFG} is not valid JSON ({e}); restore the SAE dir or rerun `saepipe train`"
        ) from None
    missing = [key for key in ("architecture", "d_in", "d_sae") if key not in cfg]
    if missing:
        raise SaepipeError(
            f"{path}/{CFG} lacks {', '.join(missing)}; restore the SAE dir or rerun `saepipe train`"
        )
    arch = cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise SaepipeError(
            f"{path}: unknown architecture {arch!r}; this saepipe reads {', '.join(ARCHITECTURES)}"
        )
    hparams = dict(cfg.get("saepipe", {}).get("hparams") or {})
    if "matryoshka_prefixes" in cfg:
        hparams["prefixes"] = cfg["matryoshka_prefixes"]
    try:
        sae = build_sae(arch, int(cfg["d_in"]), int(cfg["d_sae"]), k=cfg.get("k"), hparams=hparams)
    except (TypeError, ValueError) as e:
        raise SaepipeError(
            f"{path}/{CFG} has unusable values ({e}); restore the SAE dir or rerun `saepipe train`"
        ) from None
    try:
        tensors = load_file(str(path / WEIGHTS))
    except SafetensorError as e:  # truncated or not safetensors at all; never fall back to pickle
        raise SaepipeError(
            f"{path}/{WEIGHTS} is damaged or not a safetensors file ({e}); restore the SAE dir or rerun "
            "`saepipe train`"
        ) from None
    expected = set(sae_tensors(sae))
    if set(tensors) != expected:
        raise SaepipeError(
            f"{path}/{WEIGHTS} holds {sorted(tensors)}, expected {sorted(expected)} for {arch}"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            target = getattr(sae, name)
            if target.shape != value.shape:
                raise SaepipeError(
                    f"{path}: {name} has shape {list(value.shape)}, expected {list(target.shape)}"
                )
            target.copy_(value)
    sae.cfg = cfg
    if cfg.get("normalize_activations") == token_norm.CFG_VALUE:
        sae = token_norm.with_token_norm(sae)
    return sae.to(device).eval()
