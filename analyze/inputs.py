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
from saepipe.train.sae_dir import SAERecord


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
    record = SAERecord.of(sae)
    store_path = store_path or record.store_path
    if not store_path:
        raise SaepipeError(f"--sae {sae_path}: its cfg.json records no store; give --store")
    store = open_store(store_path)
    hook = hook or record.hook_name
    if not hook:
        raise SaepipeError(f"--sae {sae_path}: its cfg.json names no hook_name; give --hook")
    if hook not in store.hooks:
        raise SaepipeError(
            f"store {store_path} has no hook {hook!r} (it holds {', '.join(store.hooks)}); give --hook or the "
            "store the SAE was trained on"
        )
    record.compatible_with(store, sae_path)
    return Inputs(sae, store, hook)


def load_saes(sae_paths: list[str], store: ActivationStore, device: Any) -> list:
    """Load SAE dirs that are all read against `store`, each checked against it (width, model)."""
    saes = [load_sae(p, device=device) for p in sae_paths]
    for sae, path in zip(saes, sae_paths):
        SAERecord.of(sae).compatible_with(store, path)
    return saes


def resolve_hook(store: ActivationStore, saes: list, hook: str | None) -> str:
    """The hook to read: the one given, else the SAEs' common `hook_name`, else the store's only hook."""
    if hook is None:
        names = {SAERecord.of(s).hook_name for s in saes}
        if len(names) == 1 and next(iter(names)) in store.hooks:
            hook = next(iter(names))
        elif len(store.hooks) == 1:
            hook = store.hooks[0]
        else:
            raise SaepipeError(
                f"cannot tell which hook of {store.path} the SAEs read ({sorted(map(str, names))}); give --hook"
            )
    if hook not in store.hooks:
        raise SaepipeError(f"store {store.path} has no hook {hook!r}; it holds: {', '.join(store.hooks)}")
    return hook


def excluded_tokens(sae_cfg: dict, store: ActivationStore) -> list[int]:
    """Token ids whose positions the SAE never trained on (`saepipe train --drop-special`, the default
    since issue 19): the store's BOS/EOS ids plus any --special-token-ids. Evaluation leaves them
    untouched, like BOS. An SAE dir written before the flag existed trained on them: none."""
    training = SAERecord.of(sae_cfg).training
    if not training.get("drop_special", False):
        return []
    return sorted({*store.special_token_ids, *(int(t) for t in training.get("special_token_ids") or [])})
