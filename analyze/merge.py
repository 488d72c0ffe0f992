"""Merged SAE dirs: one latent per split family, written as an ordinary SAE dir (issue 13).

A cut of the families (saepipe.analyze.families) defines, for the wide SAE's code z(x), the exact family
code a_F(x) = sum_{i in F} w_i z_i(x) and the decoder rows u_F. The exact code is not one linear map of x
followed by the SAE nonlinearity: a TopK selection, or a sum of ReLUs, is not linear in x. So the dir is
written in two forms:

- `sae_weights.safetensors` + `cfg.json`: an ordinary SAE of the merged width that `load_sae`, `saepipe
  analyze`, `evaluate`, `recovery` and SAELens read unchanged. Its architecture follows the wide SAE's:
  topk -> topk with the same k, relu -> relu, and threshold architectures (jumprelu, batchtopk,
  matryoshka) -> jumprelu. A family of one keeps its latent's encoder column, bias, threshold and decoder
  row exactly (an SAE with no splits merges to itself). A family of two or more gets decoder row u_F and
  the encoder pre_F = alpha_F p_F(x) + beta_F, where p_F = (x - b_dec) . e_F + b_F is the least-squares
  linear predictor of a_F from x over all tokens, (X~^T X~ + ridge)^-1 X~^T a_F, and (alpha_F, beta_F)
  rescale it to a_F on the tokens where the family fires (family_stats.FamilyStats.affine); its
  threshold (jumprelu) is min_i w_i theta_i, the smallest value the exact code takes when it fires.
  This is an approximation of the exact code; `saepipe families` measures the gap (FVU, L0 and per
  family firing F1 of this encoder against the exact code, on the same tokens).
- `families.safetensors` (family [m] int64, weight [m] float32) beside them: with the wide SAE named in
  cfg.json (`saepipe.merged.source`), `load_exact` rebuilds the exact code, encode(x) = z(x) @ W.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save

from saepipe.analyze.families import MergedDecoder
from saepipe.analyze.family_stats import weight_matrix
from saepipe.errors import SaepipeError
from saepipe.files import write_bytes_atomic

FAMILIES_FILE = "families.safetensors"
MERGED_ARCHITECTURE = {
    "topk": "topk",
    "relu": "relu",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
}
"""The wide SAE's architecture -> the merged dir's."""


def fit_directions(xx: np.ndarray, xz: np.ndarray, md: MergedDecoder, ridge: float = 1e-6) -> np.ndarray:
    """[d+1, n_families]: per family the least-squares (e_F, b_F) predicting a_F from X~ = [x - b_dec, 1]
    over all tokens; xx = X~^T X~, xz [m, d+1] = Z^T X~ (so X~^T a_F = sum_i w_i xz_i)."""
    xa = np.asarray((weight_matrix(md).T @ xz).T)  # [d+1, n_families]
    lam = ridge * max(float(np.trace(xx)) / len(xx), 1e-12)
    return np.linalg.solve(xx + lam * np.eye(len(xx)), xa)


def merged_tensors(
    wide: Any, md: MergedDecoder, fit: np.ndarray, alpha: np.ndarray, beta: np.ndarray
) -> tuple[str, dict[str, np.ndarray]]:
    """(architecture, SAE-dir tensors) of the merged dictionary (module doc)."""
    arch = MERGED_ARCHITECTURE.get(wide.architecture)
    if arch is None:
        raise SaepipeError(
            f"cannot merge a {wide.architecture!r} SAE; merging reads {', '.join(MERGED_ARCHITECTURE)}"
        )
    t = {name: v.detach().float().cpu().numpy() for name, v in _wide_tensors(wide).items()}
    d, n = t["W_enc"].shape[0], len(md.decoder)
    live = np.flatnonzero(md.family >= 0)
    first = live[np.unique(md.family[live], return_index=True)[1]]  # per family its smallest member
    W_enc, b_enc = t["W_enc"][:, first].copy(), t["b_enc"][first].copy()
    multi = np.flatnonzero(md.sizes > 1)
    W_enc[:, multi] = fit[:d, multi] * alpha[multi]
    b_enc[multi] = fit[d, multi] * alpha[multi] + beta[multi]
    out = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": md.decoder.copy(), "b_dec": t["b_dec"].copy()}
    W_dec = out["W_dec"]
    W_dec[md.sizes == 1] = t["W_dec"][first[md.sizes == 1]]
    if arch == "jumprelu":
        theta = t["threshold"][first].copy()
        low = np.full(n, np.inf)
        np.minimum.at(low, md.family[live], (md.weight * t["threshold"])[live])
        theta[multi] = np.maximum(low[multi], 0.0)
        out["threshold"] = theta
    assert out["W_dec"].shape == (n, d)
    return arch, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _wide_tensors(wide: Any) -> dict[str, torch.Tensor]:
    out = {"W_enc": wide.W_enc, "b_enc": wide.b_enc, "W_dec": wide.W_dec, "b_dec": wide.b_dec}
    if wide.has_threshold:
        out["threshold"] = wide.threshold
    return out


def write_merged(
    path: str | Path,
    wide: Any,
    wide_path: str,
    arch: str,
    tensors: dict[str, np.ndarray],
    md: MergedDecoder,
    info: dict,
) -> Path:
    """Write the merged SAE dir through the SAE dir contract (train/sae_dir.py) plus families.safetensors."""
    from saepipe.train.sae_dir import save_sae
    from saepipe.train.saes import build_sae

    cfg = wide.cfg
    n = len(md.decoder)
    k = wide.k if arch == "topk" else None
    if k is not None and int(k) > n:
        raise SaepipeError(
            f"a merge down to {n} families cannot keep the wide SAE's k={k}; merge to at least {k}"
        )
    hparams = dict(wide.hparams) if arch == wide.architecture else {}
    sae = build_sae(arch, int(cfg["d_in"]), n, k=k, hparams=hparams)
    with torch.no_grad():
        for name, value in tensors.items():
            sae.set_tensor(name, torch.from_numpy(value))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    families = {"family": md.family.astype(np.int64), "weight": md.weight.astype(np.float32)}
    write_bytes_atomic(path / FAMILIES_FILE, save(families))
    top = {key: cfg[key] for key in ("context_size", "prepend_bos", "dataset_path") if key in cfg}
    own = cfg.get("saepipe") or {}
    saepipe = {"store": own.get("store", []), "merged": {"source": str(Path(wide_path).resolve()), **info}}
    return save_sae(sae, path, cfg.get("hook_name"), cfg.get("model_name"), 1.0, **top, saepipe=saepipe)


class ExactMerged(torch.nn.Module):
    """The exact family code of a merged dir: encode(x) = wide.encode(x) @ W, decode(a) = a @ W_dec + b_dec."""

    def __init__(self, wide: Any, merged: Any, family: np.ndarray, weight: np.ndarray):
        super().__init__()
        self.wide, self.merged, self.cfg = wide, merged, merged.cfg
        sizes = np.bincount(family[family >= 0], minlength=merged.d_sae)
        md = MergedDecoder(family, weight.astype(np.float64), merged.W_dec.detach().cpu().numpy(), sizes)
        W = torch.from_numpy(weight_matrix(md).toarray()).float()
        self.register_buffer("W", W.to(merged.W_dec.device))
        self.W_dec, self.b_dec, self.d_sae = merged.W_dec, merged.b_dec, merged.d_sae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide.encode(x) @ self.W

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        return self.merged.decode(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def load_exact(path: str | Path, device: str = "cpu") -> ExactMerged:
    """The exact family code of the merged dir at `path` (its wide SAE must still be where it was)."""
    from saepipe.train import load_sae

    path = Path(path)
    merged = load_sae(path, device=device)
    from saepipe.train.sae_dir import SAERecord

    info = SAERecord.of(merged).merged
    if not info or not (path / FAMILIES_FILE).is_file():
        raise SaepipeError(
            f"{path} is not a merged SAE dir (no saepipe.merged in cfg.json or no {FAMILIES_FILE})"
        )
    wide = load_sae(info["source"], device=device)
    f = load_file(str(path / FAMILIES_FILE))
    if len(f["family"]) != wide.d_sae or int(f["family"].max()) + 1 != merged.d_sae:
        raise SaepipeError(
            f"{path}/{FAMILIES_FILE} does not match its wide SAE {info['source']}; rerun `saepipe families`"
        )
    return ExactMerged(wide, merged, f["family"].astype(np.int64), f["weight"]).eval()


def merged_info(path: str | Path) -> dict | None:
    """cfg.json's `saepipe.merged` section of an SAE dir, or None for an SAE that was not merged."""
    try:
        cfg = json.loads((Path(path) / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return (cfg.get("saepipe") or {}).get("merged")


def label_merged(metrics: dict[str, dict], dirs: dict[str, str]) -> dict[str, dict]:
    """Recovery-table metrics (recovery_table.frontier_metrics) with each merged SAE's architecture shown
    as what it was merged from, so a merged row is not mistaken for an SAE trained at that width."""
    out = {name: dict(v) for name, v in metrics.items()}
    for name, path in dirs.items():
        info = merged_info(path)
        if info:
            row = out.setdefault(name, {})
            row["architecture"] = f"{row.get('architecture', 'sae')} merged from {Path(info['source']).name}"
    return out
