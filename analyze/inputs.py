"""Open what the analyze stage reads: an SAE dir (through `saepipe.train.load_sae`) and its store, checked
against each other so a report never mixes a model, a store and an SAE that do not belong together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saepipe.errors import SaepipeError
from saepipe.harvest import ActivationStore, open_store
from saepipe.train import load_sae
from saepipe.train.sae_dir import model_fingerprints, recorded_stores


@dataclass
class Inputs:
    sae: Any  # saepipe.train SAE module: .cfg, .encode, .decode, W_enc/b_enc/W_dec/b_dec
    store: ActivationStore
    hook: str


def open_inputs(sae_path: str, store_path: str | None, hook: str | None, device: torch.device) -> Inputs:
    """Load the SAE, open its store (given or recorded in cfg.json) and check hook, width and model."""
    if not Path(sae_path).is_dir():
        raise SaepipeError(f"--sae {sae_path}: no such directory; give an SAE dir written by `saepipe train`")
    sae = load_sae(sae_path, device)
    records = recorded_stores(sae.cfg)
    store_path = store_path or (records[0].get("path") if records else None)
    if not store_path:
        raise SaepipeError(f"--sae {sae_path}: its cfg.json records no store; give --store")
    store = open_store(store_path)
    hook = hook or sae.cfg.get("hook_name")
    if not hook:
        raise SaepipeError(f"--sae {sae_path}: its cfg.json names no hook_name; give --hook")
    if hook not in store.hooks:
        raise SaepipeError(
            f"store {store_path} has no hook {hook!r} (it holds {', '.join(store.hooks)}); give --hook or the "
            "store the SAE was trained on"
        )
    if int(sae.cfg["d_in"]) != store.d_model:
        raise SaepipeError(
            f"SAE {sae_path} takes d_in={sae.cfg['d_in']} but store {store_path} has d_model={store.d_model}; "
            "give the store the SAE was trained on"
        )
    fingerprints = model_fingerprints(sae.cfg)
    if fingerprints and store.settings["model"]["fingerprint"] not in fingerprints:
        raise SaepipeError(
            f"SAE {sae_path} was trained on activations of a different model than store {store_path} "
            "(model fingerprints differ); give a store of the same model"
        )
    return Inputs(sae, store, hook)
