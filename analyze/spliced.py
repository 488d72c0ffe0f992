"""Fraction of loss recovered for several SAEs: `saepipe evaluate`'s own numbers, for the reports that
compare SAEs (frontier, splitting, families). Only a store harvested from a model has a model to splice
an SAE into; a synthetic one has none.
"""

from __future__ import annotations

from typing import Any

from saepipe.errors import SaepipeError

SPLICED_KEYS = ("loss_recovered", "kl", "ce_clean", "ce_spliced", "ce_zero")
"""What the frontier takes from each `saepipe evaluate` result."""


def spliced_metrics(
    sae_paths: list[str], store: str, contexts: int, batch_size: int, device: str, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Per SAE dir, `saepipe evaluate`'s loss recovered, KL and losses on `contexts` held-out contexts."""
    from saepipe.analyze.config import EvaluateConfig
    from saepipe.analyze.evaluate import evaluate

    out = {}
    for path in sae_paths:
        cfg = EvaluateConfig(sae=path, store=store, contexts=contexts, batch_size=batch_size, device=device)
        res = evaluate(cfg, progress=progress)
        out[path] = {k: float(getattr(res, k)) for k in SPLICED_KEYS}
    return out


def wanted_spliced(
    want: bool | None,
    store: Any,
    store_path: str,
    sae_paths: list[str],
    contexts: int,
    batch_size: int,
    device: str,
    progress: bool,
) -> dict[str, dict[str, float]]:
    """`spliced_metrics` when asked for (`want`; None: whenever the store has a model), else {}."""
    if want is None:
        want = not store.info.is_synthetic
    if not want:
        return {}
    if store.info.is_synthetic:
        raise SaepipeError(
            f"store {store_path} was not harvested from a model (synthetic or hand-made): there is no model to "
            "splice the SAEs into; drop --loss-recovered"
        )
    return spliced_metrics(sae_paths, store_path, contexts, batch_size, device, progress)
