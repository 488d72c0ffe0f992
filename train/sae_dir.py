"""The SAE dir: what the train stage writes and every later stage reads. This module is its contract.

An SAE dir is also a SAELens 6.x SAE dir: `sae_lens.SAE.load_from_disk(dir)` loads every architecture and
encodes/decodes as saepipe does (checked in CI against sae-lens 6.54.12 by tests/test_saelens_interop.py).

Layout (format version 2):

    sae_weights.safetensors   float32 tensors
        W_enc      [d_in, d_sae]
        b_enc      [d_sae]
        W_dec      [d_sae, d_in]
        b_dec      [d_in]
        threshold  [d_sae]        only for jumprelu, batchtopk and matryoshka (batch selection)
    cfg.json
        architecture            SAELens's name for the inference function (`saelens_architecture`):
                                relu -> "standard"; topk -> "topk"; jumprelu, batchtopk, matryoshka ->
                                "jumprelu" (SAELens itself saves BatchTopK and Matryoshka SAEs so);
                                matryoshka with token selection -> "topk"
        d_in, d_sae, dtype ("float32"), device ("cpu")
        apply_b_dec_to_input    true
        normalize_activations   "none" (a dataset-wide training scale is folded into the weights), or
                                "constant_norm_rescale" (trained on per-token normalised inputs,
                                saepipe.train.token_norm: applied by encode, undone by decode; SAELens
                                applies it the same way)
        reshape_activations     "none"
        k                       SAELens "topk" only (SAELens's TopKSAEConfig.k)
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
                                        matryoshka_batchtopk; matryoshka_topk for token selection,
                                        which SAELens does not train)
            training_architecture_details  {k, and the architecture settings}
        hook_name, hook_layer, hook_head_index, model_name, model_class_name,
        model_from_pretrained_kwargs, context_size, prepend_bos, dataset_path, seqpos_slice,
        neuronpedia_id          the same values at top level, where SAELens 5 and SAEBench read them
        saepipe                 saepipe's own section:
            format_version      2
            architecture        "relu" | "topk" | "batchtopk" | "jumprelu" | "matryoshka"
            k                   topk, batchtopk, matryoshka (batchtopk/matryoshka: the training batch L0)
            hparams             the architecture settings (matryoshka: `prefixes`, the nested sizes,
                                and `selection`, "batch" or "token")
            input_scale         the folded normalisation factor
            store               [{path, model_fingerprint, hook}] one per training store
            training            the resolved training settings

Format version 1 (saepipe before SAELens interop) kept `architecture` in saepipe's vocabulary at top
level with `k` and `matryoshka_prefixes` beside it and no `saepipe.architecture`; `load_sae` still reads
it (those dirs load in SAELens only for topk and jumprelu).

Later stages ask their questions of a loaded dir through `SAERecord.of(sae)` (width, hook, training
stores and model fingerprints, `compatible_with(store)`), never through cfg.json's keys.

Semantics, for raw activations x [..., d_in]:
    pre = (x - b_dec) @ W_enc + b_enc
    relu: relu(pre); topk and token-selection matryoshka: the k largest of relu(pre) per token, others 0;
    jumprelu, batchtopk, matryoshka: pre * (pre > threshold)   (threshold >= 0, so SAELens's
    relu(pre) * (pre > threshold) is the same function)
    decode(z) = z @ W_dec + b_dec

If training scaled inputs by s (x_n = s x), the saved weights map raw activations: W_enc * s, W_dec / s,
b_dec / s (b_enc and threshold unchanged), which gives the same code and reconstruction / s.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from saepipe.errors import SaepipeError
from saepipe.files import write_bytes_atomic, write_text_atomic
from saepipe.train import token_norm
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


def saelens_architecture(arch: str, hparams: dict[str, Any]) -> str:
    """SAELens's inference architecture for one SAE: a token-selection Matryoshka encodes as TopK."""
    if arch == "matryoshka" and hparams.get("selection") == "token":
        return "topk"
    return SAELENS_ARCHITECTURE[arch]


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
    normalize = extra.pop("normalize_activations", "none")  # token_norm.CFG_VALUE for --token-norm
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
        "architecture": saelens_architecture(arch, sae.hparams),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": normalize,
        "reshape_activations": "none",
        **({"k": sae.k} if saelens_architecture(arch, sae.hparams) == "topk" else {}),
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT,
            "sae_lens_training_version": None,
            **described,
            "training_architecture": (
                "matryoshka_topk"
                if saelens_architecture(arch, sae.hparams) == "topk" and arch == "matryoshka"
                else SAELENS_TRAINING_ARCHITECTURE[arch]
            ),
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
    tensors = sae_tensors(sae, input_scale)
    write_bytes_atomic(path / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    write_text_atomic(path / CFG, json.dumps(cfg, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class SAERecord:
    """A typed view of a loaded cfg.json: what later stages ask of an SAE dir (`SAERecord.of(sae)`)."""

    d_in: int
    d_sae: int
    hook_name: str | None
    model_name: str | None
    stores: tuple[dict, ...]
    """The training stores, {path, model_fingerprint, hook} each (format 1 dirs may hold one dict,
    hand-written ones none)."""
    training: dict
    """The resolved training settings (empty for a dir saepipe did not train)."""
    merged: dict | None
    """`saepipe families`' record of the wide SAE a merged dir came from; None for any other SAE."""

    @classmethod
    def of(cls, sae_or_cfg: Any) -> SAERecord:
        cfg = sae_or_cfg if isinstance(sae_or_cfg, dict) else sae_or_cfg.cfg
        own = cfg.get("saepipe") or {}
        records = own.get("store") or []
        return cls(
            d_in=int(cfg["d_in"]),
            d_sae=int(cfg["d_sae"]),
            hook_name=cfg.get("hook_name"),
            model_name=cfg.get("model_name"),
            stores=tuple([records] if isinstance(records, dict) else records),
            training=own.get("training") or {},
            merged=own.get("merged"),
        )

    @property
    def store_path(self) -> str | None:
        """The first recorded training store (what `--store` defaults to)."""
        return self.stores[0].get("path") if self.stores else None

    @property
    def model_fingerprints(self) -> set[str]:
        """Fingerprints of the model(s) whose activations trained the SAE (empty when none is recorded)."""
        return {r.get("model_fingerprint") for r in self.stores} - {None}

    def compatible_with(self, store: Any, path: str | Path) -> None:
        """Refuse (one line) a store whose width or model is not the one SAE dir `path` was trained on."""
        if self.d_in != store.d_model:
            raise SaepipeError(
                f"SAE {path} takes d_in={self.d_in} but store {store.path} has d_model={store.d_model}; give "
                "the store the SAE was trained on"
            )
        fingerprints = self.model_fingerprints
        if fingerprints and store.info.model_fingerprint not in fingerprints:
            raise SaepipeError(
                f"SAE {path} was trained on activations of another model (or synthetic set) than store "
                f"{store.path} (model fingerprints differ); give the store it was trained on"
            )


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
    expected = saelens_architecture(arch, hparams)
    if "architecture" in own and cfg["architecture"] != expected:
        raise SaepipeError(
            f"{path}/{CFG}: architecture {cfg['architecture']!r} does not match saepipe.architecture {arch!r} "
            f"(SAELens would load it as {expected!r}); restore the SAE dir or rerun "
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
    if cfg.get("normalize_activations") == token_norm.CFG_VALUE:
        sae = token_norm.with_token_norm(sae)
    return sae.to(device).eval()
