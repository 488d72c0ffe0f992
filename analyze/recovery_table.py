"""The recovery-by-frequency table: several `saepipe recovery` reports side by side (issue 5).

Why: the question "are rare true features represented at all, as width and architecture vary" is answered
by one table, not ten JSON files. Rows are SAEs (architecture x width), columns the feature-frequency bins
of the synthetic set from rarest to most frequent, then the whole-dictionary numbers (MMCS, matched score)
and, when the caller measured them, L0, FVU and loss recovered.

Pure: input is what `saepipe recovery --out` writes (a JSON dict per SAE, keyed by SAE name), plus optional
per-SAE metrics (e.g. the frontier's L0 and FVU); output is the markdown and the same numbers as JSON.
Architecture, width and k come from the metrics when given, else from the trainer's SAE names
(`<arch>-w<width>[-k<k>]`, train/config.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saepipe.errors import SaepipeError

BIN_VALUES = {
    "fraction_recovered": "fraction of features whose best latent has cosine >= recovered_cos",
    "mean_best_cos": "mean over features of the best latent's decoder cosine",
    "mean_matched_cos": "mean over features of the one-to-one (Hungarian) matched cosine",
    "mean_best_f1": "mean over features of the best latent's firing F1",
    "mean_spread": "mean number of latents a feature is spread over",
}
"""Per-bin quantities of a recovery report that the decile cells can show."""

SUMMARY_COLUMNS = {  # column title -> (key, format)
    "MCC": ("mcc", ".3f"),
    "F1": ("f1", ".3f"),
    "absorption": ("absorption_rate", ".3f"),
    "MMCS": ("mmcs", ".3f"),
    "matched": ("matched_score", ".3f"),
    "L0": ("l0", ".2f"),
    "FVU": ("fvu", ".3f"),
    "loss rec.": ("loss_recovered", ".3f"),
}
"""Whole-SAE columns after the bins; one appears only when some row has a value for it."""

ARCH_ORDER = ("topk", "batchtopk", "jumprelu", "relu", "matryoshka")
_NAME = re.compile(r"^(?P<arch>[a-z_]+)-w(?P<width>\d+)(?:-k(?P<k>\d+))?(?:-t(?P<tokens>\d+))?$")


@dataclass(frozen=True)
class RecoveryTable:
    markdown: str
    data: dict[str, Any]
    """JSON-ready: `value`, `bins` (rarest first: n_features, freq_min, freq_max) and `rows` (per SAE: name,
    architecture, width, k, `bins` values rarest first, `all`, and each summary key, None where unknown)."""

    def json(self) -> str:
        return json.dumps(self.data, indent=1)


def _identity(name: str, report: Mapping, extra: Mapping) -> tuple[str, int | None, int | None, int | None]:
    m = _NAME.match(Path(name).name)
    arch = extra.get("architecture") or report.get("architecture") or (m["arch"] if m else name)
    width = extra.get("d_sae") or report.get("d_sae") or (int(m["width"]) if m else None)
    k = extra.get("k") or report.get("k") or (int(m["k"]) if m and m["k"] else None)
    tokens = extra.get("tokens") or (int(m["tokens"]) if m and m["tokens"] else None)
    as_int = lambda v: int(v) if v is not None else None  # noqa: E731
    return str(arch), as_int(width), as_int(k), as_int(tokens)


def _bins_rarest_first(name: str, report: Mapping) -> list[Mapping]:
    try:
        bins = report["by_frequency"]
    except KeyError:
        raise SaepipeError(
            f"{name}: not a recovery report (no by_frequency); give what `saepipe recovery --out` writes"
        ) from None
    return list(reversed(bins))  # recovery.py lists the most frequent bin first


def _number(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _samples(tokens: int | None) -> str:
    if tokens is None:
        return "–"
    return f"{tokens / 2**20:g}Mi" if tokens % 2**17 == 0 else f"{tokens:,}"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _sort_key(row: dict) -> tuple:
    arch = row["architecture"]
    rank = ARCH_ORDER.index(arch) if arch in ARCH_ORDER else len(ARCH_ORDER)
    return rank, arch, row["width"] or 0, row["k"] or 0, row["tokens"] or 0, row["name"]


def recovery_table(
    reports: Mapping[str, Mapping[str, Any]],
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    value: str = "fraction_recovered",
) -> RecoveryTable:
    """The table of `value` by frequency bin for every report (keyed by SAE name or dir).

    `metrics[name]` may add l0, fvu, loss_recovered, architecture, d_sae and k for that SAE. Every report
    must come from the same synthetic set (the same bins), or the columns would not mean one thing.
    """
    if value not in BIN_VALUES:
        raise SaepipeError(f"unknown table value {value!r}; choose one of {', '.join(BIN_VALUES)}")
    if not reports:
        raise SaepipeError("no recovery reports to tabulate; run `saepipe recovery --out` for each SAE first")
    metrics = metrics or {}
    unknown = sorted(set(metrics) - set(reports))
    if unknown:
        raise SaepipeError(f"metrics given for SAEs without a recovery report: {', '.join(unknown)}")
    ref_name, ref_bins = None, None
    rows = []
    for name, report in reports.items():
        bins = _bins_rarest_first(name, report)
        shape = [(b["n_features"], b["freq_min"], b["freq_max"]) for b in bins]
        if ref_bins is None:
            ref_name, ref_bins = name, shape
        elif shape != ref_bins:
            raise SaepipeError(
                f"recovery reports {ref_name} and {name} have different frequency bins (another synthetic set "
                "or another --n-bins); tabulate reports of one synthetic set with one --n-bins"
            )
        extra = metrics.get(name, {})
        arch, width, k, tokens = _identity(name, report, extra)
        values = [float(b[value]) for b in bins]
        n_feat = [b["n_features"] for b in bins]
        row: dict[str, Any] = {"name": name, "architecture": arch, "width": width, "k": k, "tokens": tokens}
        row["bins"] = values
        row["all"] = sum(v * n for v, n in zip(values, n_feat)) / sum(n_feat)  # bins partition the features
        for key, _ in SUMMARY_COLUMNS.values():
            row[key] = _number(extra.get(key, report.get(key)))
        rows.append(row)
    rows.sort(key=_sort_key)
    assert ref_bins is not None
    bins_json = [{"n_features": n, "freq_min": lo, "freq_max": hi} for n, lo, hi in ref_bins]
    shown = {t: kf for t, kf in SUMMARY_COLUMNS.items() if any(r[kf[0]] is not None for r in rows)}

    budgets = any(r["tokens"] is not None for r in rows)
    head = ["architecture", "width"] + (["samples"] if budgets else [])
    head += [f"{i + 1}: {b['freq_min']:.1e}–{b['freq_max']:.1e}" for i, b in enumerate(bins_json)]
    head += ["all", *shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        arch = r["architecture"] + (f" (k={r['k']})" if r["k"] is not None else "")
        cells = [arch, str(r["width"] if r["width"] is not None else "?")]
        cells += [_samples(r["tokens"])] if budgets else []
        cells += [f"{v:.2f}" for v in r["bins"]] + [f"{r['all']:.2f}"]
        cells += [_fmt(r[key], spec) for key, spec in shown.values()]
        lines.append("| " + " | ".join(cells) + " |")
    caption = (
        f"Cells: {BIN_VALUES[value]}, by true-feature frequency bin (equal feature counts, per-token "
        f"frequency range in the header), rarest first; `all` over every feature."
    )
    data = {"value": value, "description": BIN_VALUES[value], "bins": bins_json, "rows": rows}
    return RecoveryTable("\n".join(lines) + "\n\n" + caption + "\n", data)


def load_reports(paths: Mapping[str, str | Path]) -> dict[str, dict]:
    """{name: report} from `saepipe recovery --out` JSON files, keyed as given."""
    out = {}
    for name, path in paths.items():
        try:
            out[name] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SaepipeError(f"cannot read recovery report {path}: {e}") from None
    return out


def frontier_metrics(rows: list[Mapping[str, Any]]) -> dict[str, dict]:
    """The frontier's rows (frontier.json) as `metrics` for `recovery_table`, keyed by SAE dir name."""
    keep = ("architecture", "d_sae", "k", "l0", "fvu", "loss_recovered")
    return {Path(r["sae"]).name: {k: r[k] for k in keep if r.get(k) is not None} for r in rows}
