"""`saepipe families`: split families of a wide SAE, merged dictionaries at several cuts, and what merging
costs (issue 13).

    saepipe families --sae runs/x/topk-w8192-k11 --store STORE --out reports/fam --width 2048 --threshold 0.5
    saepipe families --sae WIDE --ladder NARROW [--ladder NARROWER] --baselines SAME_WIDTH --store S --out D

Three passes over the store (saepipe.analyze.family_stats): latent statistics (and the ladder's split
links, and every SAE's L0/FVU), then per cut the family statistics and the merged encoder's affine fit,
then the written merged dirs against the exact family code. Writes OUT/families.json (every family of every
cut: members with weight and cosine to the family direction, parent, sibling co-firing, energy kept, parent
mass covered), OUT/tradeoff.csv (per SAE and cut: width, L0, FVU, firing F1 against the exact code, loss
recovered on a model's store), one merged SAE dir per cut under OUT/merged/, and the pages OUT/index.html.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from saepipe.config import StageConfig
from saepipe.errors import SaepipeError
from saepipe.files import write_text_atomic


class FamiliesConfig(StageConfig):
    sae: str
    """The wide SAE dir whose latents are grouped into families."""
    store: str
    """The activation store to stream (the SAE's hook must be in it)."""
    out: str
    """Report directory: families.json, tradeoff.csv, merged/<name>/ SAE dirs, index.html."""
    ladder: list[str] = Field(default_factory=list)
    """A narrower SAE of the same model and hook; repeat for several. Families then descend from one latent
    of the narrowest (through split links level by level), and only latents with the same parent merge."""
    baselines: list[str] = Field(default_factory=list)
    """SAEs measured on the same tokens for comparison only (e.g. one trained directly at the merged width)."""
    threshold: list[float] = Field(default_factory=list)
    """Merge while the best pair's direction cosine is at least this; repeat for several cuts (0 < t <= 1)."""
    width: list[int] = Field(default_factory=list)
    """Merge until this many families remain (or no allowed merge is left); repeat for several cuts."""
    candidate_cos: float = Field(0.3, gt=0, le=1)
    """Decoder cosine below which two latents are never linked directly."""
    max_cofire: float = Field(0.1, ge=0, le=1)
    """Two clusters merge only if tokens where both fire / the rarer one's firing tokens is at most this
    (siblings of a split are exclusive; latents that fire together are a composition, kept apart)."""
    direction: str = "refit"
    """A family's decoder row: `refit`, the top principal direction of the family's reconstructions (keeps
    the most of them), or `mean`, the activation-weighted mean of its members' unit rows (the direction
    merging is scored by). Measured on the real-model ladder (bench/RESULTS.md): refit has the lower FVU and
    the higher loss recovered at every cut."""
    link_cos: float = Field(0.3, ge=-1, le=1)
    """Ladder links: decoder cosine a latent needs to its parent (as `saepipe splitting --min-cos`)."""
    link_coactivation: float = Field(0.5, ge=0, le=1)
    """Ladder links: fraction of a latent's firing on its parent's tokens (`--min-coactivation`)."""
    hook: str | None = None
    """Hook to read (default: the SAE's hook_name)."""
    max_tokens: int | None = Field(None, gt=0)
    """Use at most this many tokens from the start of the store."""
    batch_tokens: int = Field(4096, gt=0)
    """Tokens encoded at once."""
    device: str = "cpu"
    """Device to encode on (cpu, cuda, cuda:N)."""
    loss_recovered: bool | None = None
    """Splice every SAE (wide, merged, ladder, baselines) into its model for `saepipe evaluate`'s loss
    recovered and KL (default: on for a store harvested from a model, off for a synthetic one)."""
    eval_contexts: int = Field(64, gt=0)
    """Held-out contexts per SAE for loss recovered."""
    eval_batch_size: int = Field(8, gt=0)
    """Contexts per forward pass for loss recovered."""
    pages: bool = True
    """Write the family pages (OUT/index.html): per family its members' top contexts side by side."""
    top_contexts: int = Field(8, gt=0)
    """Top activating contexts per latent shown on the pages."""
    splitting: str | None = None
    """A `saepipe splitting` report dir over the same ladder; family pages link to their parent's split tree."""

    @field_validator("threshold")
    @classmethod
    def _thresholds(cls, v: list[float]) -> list[float]:
        bad = [t for t in v if not 0 < t <= 1]
        if bad:
            raise ValueError(
                f"{bad[0]} is not a cosine in (0, 1]; give --threshold between 0 (exclusive) and 1"
            )
        return v

    @field_validator("width")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w <= 0 for w in v):
            raise ValueError("each --width is a positive number of families")
        return v

    @field_validator("direction")
    @classmethod
    def _direction(cls, v: str) -> str:
        if v not in ("mean", "refit"):
            raise ValueError(f"unknown direction {v!r}; choose mean or refit")
        return v

    @model_validator(mode="after")
    def _check(self) -> FamiliesConfig:
        if len(set(self.threshold)) != len(self.threshold) or len(set(self.width)) != len(self.width):
            raise ValueError("a --threshold or --width is given twice")
        if self.sae in self.ladder or self.sae in self.baselines:
            raise ValueError("the wide --sae is also given as --ladder or --baselines")
        return self

    def cuts(self) -> list[dict[str, Any]]:
        """The cuts in order: each {"threshold": t} or {"width": n}; default one cut at threshold 0.5."""
        cuts = [{"threshold": t} for t in sorted(self.threshold, reverse=True)]
        cuts += [{"width": w} for w in sorted(self.width, reverse=True)]
        return cuts or [{"threshold": 0.5}]


def cut_label(wide_name: str, cut: dict) -> str:
    """The merged dir's name: <wide>-merged-t<threshold> or <wide>-merged-w<width>."""
    if "width" in cut:
        return f"{wide_name}-merged-w{cut['width']}"
    return f"{wide_name}-merged-t{cut['threshold']:g}"


def merged_dirs(cfg: FamiliesConfig) -> dict[str, str]:
    """{name: path} of the merged SAE dirs a run writes (known before it runs, for pipelines)."""
    wide = Path(cfg.sae).name
    return {cut_label(wide, c): str(Path(cfg.out) / "merged" / cut_label(wide, c)) for c in cfg.cuts()}


def check_family_inputs(wide: Any, wide_path: str, others: dict[str, Any]) -> None:
    """Refuse ladder or baseline SAEs of another model, hook or input width, and a ladder SAE that is not
    narrower than the wide one."""
    from saepipe.train.sae_dir import SAERecord

    w = SAERecord.of(wide)
    for path, (sae, role) in others.items():
        r = SAERecord.of(sae)
        if (r.hook_name, r.d_in) != (w.hook_name, w.d_in):
            raise SaepipeError(
                f"{role} SAE {path} reads {r.hook_name} (d_in {r.d_in}) but --sae {wide_path} "
                f"reads {w.hook_name} (d_in {w.d_in}); give SAEs of the same hook"
            )
        a, b = r.model_fingerprints, w.model_fingerprints
        if a and b and not (a & b):
            raise SaepipeError(
                f"{role} SAE {path} was trained on another model's activations than --sae {wide_path}; give SAEs "
                "of the same model"
            )
        if role == "ladder" and sae.d_sae >= wide.d_sae:
            raise SaepipeError(
                f"--ladder {path} has {sae.d_sae} latents, not fewer than --sae {wide_path} ({wide.d_sae}); a "
                "ladder holds narrower SAEs"
            )


def run(cfg: FamiliesConfig) -> int:
    from saepipe.analyze.families_build import build_report

    report = build_report(cfg)
    print(tradeoff_table(report["tradeoff"]))
    for c in report["cuts"]:
        print(
            f"{c['name']}: {c['n_families']} families ({c['n_merged']} of two or more latents, largest "
            f"{c['largest']}), median sibling co-firing {_fmt(c['median_sibling_cofire'])}, median energy kept "
            f"{_fmt(c['median_energy_kept'])}"
            + (
                ""
                if c["reached"]
                else f"; stopped above --width {c['cut']['width']}: no pair left within --candidate-cos and "
                "--max-cofire"
            )
        )
    for band in report["pair_cofire"]:
        q = band["cofire_q10_q50_q90"]
        print(
            f"pairs with decoder cosine >= {band['cos_min']:.2f}: {band['pairs']}, co-firing 10/50/90% "
            f"{q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f} (chance {band['chance_median']:.3f}), "
            f"{band['share_exclusive']:.0%} exclusive enough to merge"
        )
    pages = ", index.html" if cfg.pages else ""
    print(f"report written to {cfg.out} (families.json, tradeoff.csv, merged/{pages})")
    return 0


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


TRADEOFF_COLUMNS = ("name", "role", "architecture", "d_sae", "l0", "fvu", "firing_f1", "loss_recovered", "kl")


def tradeoff_table(rows: list[dict]) -> str:
    """The trade-off rows as a fixed-width text table."""
    cols = [c for c in TRADEOFF_COLUMNS if any(r.get(c) is not None for r in rows)]

    def cell(v: Any) -> str:
        return "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join(
        "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
        for row in table
    )


def write_tradeoff(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(TRADEOFF_COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=float))


def median(values: list[float]) -> float | None:
    """The median, or None for no values (JSON and the pages show none)."""
    return float(np.median(values)) if values else None
