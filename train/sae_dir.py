"""The SAE dir: what the train stage writes and every later stage reads. This module is its contract.

An SAE dir is also a SAELens 6.x SAE dir: `sae_lens.SAE.load_from_disk(dir)` loads every architecture and
encodes/decodes as saepipe does (checked in CI against sae-lens 6.54.12 by tests/test_saelens_interop.py).

Layout (format version 2):

    sae_weights.safetensors   float32 tensors
        W_enc      [d_in, d_sae]
        b_enc      [d_sae]
        W_dec      [d_sae, d_in]
        b_dec      [d_in]
        threshold  [d_sae]        only for jumprelu, batchtopk and matryoshka
    cfg.json
        architecture            SAELens's name for the inference function (SAELENS_ARCHITECTURE):
                                relu -> "standard"; topk -> "topk"; jumprelu, batchtopk, matryoshka ->
                                "jumprelu" (SAELens itself saves BatchTopK and Matryoshka SAEs so)
        d_in, d_sae, dtype ("float32"), device ("cpu")
        apply_b_dec_to_input    true
        normalize_activations   "none" (any training normalisation is folded into the weights)
        reshape_activations     "none"
        k                       topk only (SAELens's TopKSAEConfig.k)
        metadata                SAELens 6.x's SAEMetadata block:
            sae_lens_version            "6.0.0": the cfg layout followed (SAELens reads a dir without it
                                        through its pre-6 converter, which drops this block)
            sae_lens_training_version   null (not trained by SAELens)
            model_name                  the model as given to `saepipe harvest`
            model_class_name            "HookedTransformer"
            model_from_pretrained_kwargs  {fold_ln, center_writing_weights, center_unembed,
                                        fold_value_biases: false}: activations come from the unprocessed
                                        weights, i.e. HookedTransformer.from_pretrained_no_processing
            hook_name, hook_layer (N of blocks.N.*, else null), hook_head_index (null)
            context_size, prepend_bos, dataset_path   when known
            seqpos_slice                [1, null] when training dropped the BOS position, else [null]
            neuronpedia_id              null until the SAE is uploaded to Neuronpedia
            training_architecture       SAELens's training name (standard, topk, jumprelu, batchtopk,
                                        matryoshka_batchtopk)
            training_architecture_details  {k, and the architecture settings}
        hook_name, hook_layer, hook_head_index, model_name, model_class_name,
        model_from_pretrained_kwargs, context_size, prepend_bos, dataset_path, seqpos_slice,
        neuronpedia_id          the same values at top level, where SAELens 5 and SAEBench read them
        saepipe                 saepipe's own section:
            format_version      2
            architecture        "relu" | "topk" | "batchtopk" | "jumprelu" | "matryoshka"
            k                   topk, batchtopk, matryoshka (batchtopk/matryoshka: the training batch L0)
            hparams             the architecture settings (matryoshka: `prefixes`, the nested sizes)
            input_scale         the folded normalisation factor
            store               [{path, model_fingerprint, hook}] one per training store
            training            the resolved training settings

Format version 1 (saepipe before SAELens interop) kept `architecture` in saepipe's vocabulary at top
level with `k` and `matryoshka_prefixes` beside it and no `saepipe.architecture`; `load_sae` still reads
it (those dirs load in SAELens only for topk and jumprelu).

Semantics, for raw activations x [..., d_in]:
    pre = (x - b_dec) @ W_enc + b_enc
    relu: relu(pre); topk: the k largest of relu(pre) per token, others 0;
    jumprelu, batchtopk, matryoshka: pre * (pre > threshold)   (threshold >= 0, so SAELens's
    relu(pre) * (pre > threshold) is the same function)
    decode(z) = z @ W_dec + b_dec

If training scaled inputs by s (x_n = s x), the saved weights map raw activations: W_enc * s, W_dec / s,
b_dec / s (b_enc and threshold unchanged), which gives the same code and reconstruction / s.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saepipe.errors import SaepipeError
from saepipe.train.saes import ARCHITECTURES, SAE, build_sae

WEIGHTS = "sae_weights.safetensors"
CFG = "cfg.json"
FORMAT_VERSION = 2
SAELENS_LAYOUT = "6.0.0"

SAELENS_ARCHITECTURE = {
    "relu": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
}
"""saepipe architecture -> the SAELens inference architecture with the same encode/decode."""

SAELENS_TRAINING_ARCHITECTURE = {
    "relu": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
    "matryoshka": "matryoshka_batchtopk",
}
"""saepipe architecture -> SAELens's name for the way it was trained (metadata.training_architecture)."""

NO_PROCESSING = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
}
"""HookedTransformer.from_pretrained kwargs that leave the weights as saepipe's TransformerBridge runs them."""

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook_name: str) -> int | None:
    """The block a TransformerLens hook name sits in (`blocks.3.hook_resid_post` -> 3), else None."""
    m = _BLOCK.match(hook_name)
    return int(m.group(1)) if m else None


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


def folded(sae: SAE, input_scale: float = 1.0) -> SAE:
    """A copy of `sae` as its SAE dir will hold it (the input scale folded in, float32, eval mode), on its
    device: what splicing a model mid-training needs, since a training SAE may see scaled inputs."""
    copy = build_sae(sae.architecture, sae.d_in, sae.d_sae, k=sae.k, hparams=sae.hparams)
    with torch.no_grad():
        for name, value in sae_tensors(sae, input_scale).items():
            getattr(copy, name).copy_(value)
    return copy.to(sae.W_dec.device).eval()


def sae_cfg(sae: SAE, hook_name: str, model_name: str, input_scale: float = 1.0, **extra: Any) -> dict:
    """cfg.json for `sae`. `extra` may give context_size, prepend_bos, dataset_path (top level and
    metadata) and `saepipe` (store, training: merged into saepipe's own section)."""
    own = dict(extra.pop("saepipe", {}))
    arch = sae.architecture
    drop_bos = (own.get("training") or {}).get("drop_bos", True)
    described = {
        "model_name": model_name,
        "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": dict(NO_PROCESSING),
        "hook_name": hook_name,
        "hook_layer": hook_layer(hook_name),
        "hook_head_index": None,
        **extra,
        "seqpos_slice": [1, None] if extra.get("prepend_bos") and drop_bos else [None],
        "neuronpedia_id": None,
    }
    details = {"k": sae.k, **sae.hparams} if sae.uses_k else dict(sae.hparams)
    return {
        "architecture": SAELENS_ARCHITECTURE[arch],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **({"k": sae.k} if arch == "topk" else {}),
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT,
            "sae_lens_training_version": None,
            **described,
            "training_architecture": SAELENS_TRAINING_ARCHITECTURE[arch],
            "training_architecture_details": details,
        },
        **described,
        "saepipe": {
            "format_version": FORMAT_VERSION,
            "architecture": arch,
            **({"k": sae.k} if sae.uses_k else {}),
            "hparams": sae.hparams,
            "input_scale": float(input_scale),
            **own,
        },
    }


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


def recorded_stores(cfg: dict) -> list[dict]:
    """The training-store records of a loaded cfg.json ({path, model_fingerprint, hook} each); format 1 dirs
    may hold one dict instead of a list, hand-written ones none."""
    records = (cfg.get("saepipe") or {}).get("store") or []
    return [records] if isinstance(records, dict) else list(records)


def model_fingerprints(cfg: dict) -> set[str]:
    """Fingerprints of the model(s) whose activations trained the SAE (empty when none is recorded)."""
    return {r.get("model_fingerprint") for r in recorded_stores(cfg)} - {None}


def _architecture(path: Path, cfg: dict) -> tuple[str, int | None, dict[str, Any]]:
    """(saepipe architecture, k, hparams) from a format 2 dir, or a format 1 dir (no saepipe.architecture)."""
    own = cfg.get("saepipe") or {}
    if not isinstance(own, dict):
        raise SaepipeError(
            f"{path}/{CFG}: `saepipe` is not an object; restore the SAE dir or rerun `saepipe train`"
        )
    hparams = dict(own.get("hparams") or {})
    if "architecture" not in own:  # format 1: saepipe's names at top level
        arch = cfg["architecture"]
        if "matryoshka_prefixes" in cfg:
            hparams["prefixes"] = cfg["matryoshka_prefixes"]
        k = cfg.get("k")
    else:
        arch, k = own["architecture"], own.get("k")
    if arch not in ARCHITECTURES:
        raise SaepipeError(
            f"{path}: unknown architecture {arch!r}; this saepipe reads {', '.join(ARCHITECTURES)}"
        )
    if "architecture" in own and cfg["architecture"] != SAELENS_ARCHITECTURE[arch]:
        raise SaepipeError(
            f"{path}/{CFG}: architecture {cfg['architecture']!r} does not match saepipe.architecture {arch!r} "
            f"(SAELens would load it as {SAELENS_ARCHITECTURE[arch]!r}); restore the SAE dir or rerun "
            "`saepipe train`"
        )
    return arch, k, hparams


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
    arch, k, hparams = _architecture(path, cfg)
    try:
        sae = build_sae(arch, int(cfg["d_in"]), int(cfg["d_sae"]), k=k, hparams=hparams)
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
            sae.set_tensor(name, value)
    sae.cfg = cfg
    return sae.to(device).eval()
