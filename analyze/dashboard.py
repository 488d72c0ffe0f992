"""The static dashboard: REPORT_DIR/index.html plus data scripts, built from a finished report.

    index.html, assets/dashboard.{js,css}
    data/index.js       the ranked list: per-latent columns (stats, every score, explanation, peak
                        token, top promoted tokens), rankings for every key, dead and ultra-dense ids
    data/vocab.js       token id -> text (vocab.json)
    data/shard_NNNNN.js `SHARD_SIZE` latents each: explanation with its n-grams and scores, top
                        contexts, weakly active samples, held-out windows with the slots the
                        explanation matches, histogram, logit effects; loaded only when one of its
                        latents is opened

Every context is shown with each token coloured by the latent's activation there (SAEDashboard and
Neuronpedia do the same), not only the peak token.

Only the list data grows with the width in one file (about 100 bytes a latent); everything per latent is
in shards, so a 16k-latent report opens as fast as a small one.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np

from saepipe.analyze.explain import Explanation, window_keys
from saepipe.analyze.heldout import SCORED_SLOTS
from saepipe.analyze.page_assets import write_asset, write_data_script
from saepipe.analyze.ranking import RANKING_KEYS
from saepipe.analyze.report import Report

LM_SCORES = ["lm_score", "lm_detection_auroc", "lm_detection_balanced_accuracy", "lm_fuzzing_auroc",
             "lm_fuzzing_balanced_accuracy"]  # fmt: skip
"""The language-model explainer's score columns (saepipe.analyze.lm_explainer.LM_COLUMNS), when present."""

SHARD_SIZE = 128
PROMOTED_IN_LIST = 3


def _b64(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(
        np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    ).decode()


def _finite(a: np.ndarray) -> list:
    """JSON has no NaN; a list with None in its place."""
    return [None if not np.isfinite(x) else float(x) for x in a]


def _context_set(rep: Report, prefix: str, latent: int, n: int | None) -> dict[str, Any]:
    a = rep.arrays
    vals = a[f"{prefix}_values"][latent]
    keep = np.flatnonzero(~np.isnan(vals))[:n]
    out = {
        "values": _b64(vals[keep], "f4"),
        "contexts": a[f"{prefix}_contexts"][latent, keep].tolist(),
        "positions": a[f"{prefix}_positions"][latent, keep].tolist(),
        "tokens": _b64(a[f"{prefix}_window_tokens"][latent, keep].ravel(), "i4"),
        "acts": _b64(rep.window_acts(prefix)[latent, keep].ravel(), "f4"),
    }
    if prefix == "heldout" and "explanation_keys" in a:  # where the explanation predicts activity
        out["predicted"] = _b64(
            _predicted(rep, latent, a["heldout_window_tokens"][latent, keep]).ravel(), "f4"
        )
    return out


def _predicted(rep: Report, latent: int, tokens: np.ndarray) -> np.ndarray:
    """[n, W] the explanation's predicted activation on each slot of these windows (0: no match; slots
    without two tokens of left context in the window are not scored and get 0)."""
    a = rep.arrays
    has = a["explanation_keys"][latent] != 0
    expl = Explanation(a["explanation_keys"][latent, has], a["explanation_predicted"][latent, has],
                       a["explanation_share"][latent, has], a["explanation_precision"][latent, has])  # fmt: skip
    pred = expl.predict(window_keys(tokens)) if len(tokens) else np.zeros((0, tokens.shape[1]))
    pred[:, : SCORED_SLOTS.start] = 0
    return np.where(tokens >= 0, pred, 0)


def write_dashboard(report_dir: str | Path) -> Path:
    """Write the dashboard for the report in `report_dir`; returns the index.html path."""
    rep = Report.open(report_dir)
    root = Path(report_dir)
    (root / "assets").mkdir(exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    write_asset(root, "assets/dashboard.js", "dashboard.js")
    write_asset(root, "assets/dashboard.css", "dashboard.css")

    L = rep.n_latents
    columns: dict[str, Any] = {
        name: _finite(rep.column(name)) for name in ("density", "mean", "mean_active", "max")
    }
    columns.update({f"score_{k}": _finite(rep.column(f"score_{k}")) for k in RANKING_KEYS})
    names = rep.table.column_names
    score_columns = [k for k in [*rep.meta.get("scores", []), *LM_SCORES] if k in names and k != "score"]
    columns.update({k: _finite(rep.column(k)) for k in score_columns})
    texts = {k: rep.column(k).tolist() for k in ("explanation", "lm_explanation") if k in names}
    columns.update({k: [t if isinstance(t, str) else "" for t in v] for k, v in texts.items()})
    columns.update(
        n_active=rep.column("n_active").tolist(),
        rank=rep.column("rank").tolist(),
        dead=rep.column("dead").tolist(),
        dense=rep.column("dense").tolist(),
        peak_token=rep.column("peak_token").tolist(),
        promoted=rep.arrays["logit_top_ids"][:, :PROMOTED_IN_LIST].tolist(),
    )
    meta = rep.meta
    title = f"{meta.get('sae', '')} · {meta.get('hook', '')} · {L} latents · {meta['n_tokens']:,} tokens"
    index = {
        "title": title,
        "n_latents": L,
        "shard_size": SHARD_SIZE,
        "rank_by": meta["rank_by"],
        "ranking_keys": list(RANKING_KEYS),
        "ranking": {k: rep.ranking(k) for k in RANKING_KEYS},
        "ranking_info": meta.get("ranking", {}),
        "score_columns": score_columns,
        "dead": rep.dead,
        "dense": rep.dense,
        "dense_threshold": meta["dense_threshold"],
        "window": meta["window"],
        "hist_edges": rep.arrays["hist_edges"].tolist(),
        "columns": columns,
    }
    write_data_script(root / "data" / "index.js", "setIndex", index)
    write_data_script(root / "data" / "vocab.js", "setVocab", {str(k): v for k, v in rep.vocab.items()})

    a = rep.arrays
    for s in range(0, L, SHARD_SIZE):
        shard = {}
        for i in range(s, min(s + SHARD_SIZE, L)):
            n_samples = int((~np.isnan(a["sample_values"][i])).sum())
            shard[str(i)] = {
                "top": _context_set(rep, "top", i, None),
                "low": _context_set(rep, "sample", i, int(np.ceil(n_samples / 2))),
                "heldout": _context_set(rep, "heldout", i, None),
                "patterns": rep.explanation(i)["patterns"],
                "hist": a["histogram"][i].tolist(),
                "logits": {
                    "top_ids": a["logit_top_ids"][i].tolist(),
                    "top_values": _finite(a["logit_top_values"][i]),
                    "bottom_ids": a["logit_bottom_ids"][i].tolist(),
                    "bottom_values": _finite(a["logit_bottom_values"][i]),
                },
            }
        write_data_script(
            root / "data" / f"shard_{s // SHARD_SIZE:05d}.js", "setShard", s // SHARD_SIZE, shard
        )
    index_html = root / "index.html"
    write_asset(root, "index.html", "index.html")  # last: the page exists only once its data does
    return index_html
