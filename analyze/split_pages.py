"""Split-tree pages: a static page beside splits.json showing, per parent, its children side by side (issue 5).

Why: a split tree's numbers say that latent i split into j and k; only their top contexts next to each
other say into what. `saepipe splitting` collects each latent's top activating positions while it streams
the store (`SparseTopN`, exact: a per-latent running top-n over the sparse codes) and `write_split_pages`
writes, in the report dir:

    index.html, assets/dashboard.css (the analyze dashboard's), assets/splits.js
    data/splits.js   SAEPIPE.setSplits({...}): the SAEs, the seed-stability verdict and seed pairs, per
                     level its counts next to the seed pair's (`seed_baseline`), the share of latents
                     found again one width up, and the parents that have children (their statistics and
                     children's cos / share / containment), and the top contexts of every shown latent,
                     keyed "<sae index>/<latent>": values, contexts, positions, windows (token ids,
                     WINDOW_BEFORE before to WINDOW_AFTER after) and the peak's index
    data/vocab.js    SAEPIPE.setVocab({id: text}): the model tokenizer's text of every token id shown;
                     empty for a store with no model (synthetic), whose token ids are shown as ⟨id⟩
    families/        with `--families DIR`: that report's family pages (split_families.py); `families` in
                     the data names its SAE, its cuts and, per cut, the family of each merged latent
    `absorbed`       with `--recovery R.json ...`: per report its SAE, the most absorbed parent features
                     and the latents that fired in their place (split_absorption.py), linking R.html

Like the analyze dashboard it works from file:// with no server: data are scripts, routing is by hash
(`#` the levels and their parents, `#level/A/parent/I` one parent with its children).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from saepipe.analyze.contexts import WINDOW_AFTER, WINDOW_BEFORE
from saepipe.analyze.page_assets import write_page


class SparseTopN:
    """Per latent, the `n` largest activations seen so far with their (context, position); ties keep the
    earlier token. Fed sparse codes batch by batch, it only touches active entries."""

    def __init__(self, n_latents: int, n: int):
        self.n_latents, self.n = n_latents, n
        self.lat = np.zeros(0, np.int64)
        self.val = np.zeros(0, np.float32)
        self.addr = np.zeros((0, 2), np.int64)
        self.threshold = np.full(n_latents, -np.inf, np.float32)  # only larger values can enter

    def update(self, latents: sp.spmatrix, addr: np.ndarray) -> None:
        """latents: [N, n_latents] (active = value > 0); addr: [N, 2] (context, position) of its rows."""
        coo = sp.coo_matrix(latents)
        ok = (coo.data > 0) & (coo.data > self.threshold[coo.col])
        lat = np.concatenate([self.lat, coo.col[ok].astype(np.int64)])
        val = np.concatenate([self.val, coo.data[ok].astype(np.float32)])
        adr = np.concatenate([self.addr, addr[coo.row[ok]].astype(np.int64)])
        order = np.lexsort((np.arange(len(lat)), -val, lat))  # by latent, value descending, arrival
        lat_s = lat[order]
        starts = np.searchsorted(lat_s, lat_s, side="left")
        keep = order[np.arange(len(order)) - starts < self.n]
        self.lat, self.val, self.addr = lat[keep], val[keep], adr[keep]
        counts = np.bincount(self.lat, minlength=self.n_latents)
        full = np.flatnonzero(counts >= self.n)
        last = np.searchsorted(self.lat, full, side="right") - 1  # kept entries stay sorted as above
        self.threshold[full] = self.val[last]

    def of(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(values [m], addresses [m, 2]) of `latent`, largest first (m <= n)."""
        lo, hi = np.searchsorted(self.lat, [latent, latent + 1])
        return self.val[lo:hi], self.addr[lo:hi]


def _shown_latents(levels: list[dict], paths: list[str]) -> list[set[int]]:
    """Per SAE of the report, the latents the pages show: parents that have children, and those children."""
    shown: list[set[int]] = [set() for _ in paths]
    for level in levels:
        a, b = paths.index(level["narrow"]), paths.index(level["wide"])
        for p in level["parents"]:
            if p["children"]:
                shown[a].add(p["latent"])
                shown[b].update(c["latent"] for c in p["children"])
    return shown


def context_windows(store: Any, addrs: np.ndarray) -> tuple[list[list[int]], list[int]]:
    """Token windows around each (context, position), read chunk by chunk; and the peak's index in each."""
    T = store.context_size
    need = np.unique(addrs[:, 0]) if len(addrs) else np.zeros(0, np.int64)
    rows: dict[int, np.ndarray] = {}
    for start, stop in store.chunk_bounds():
        here = need[(need >= start) & (need < stop)]
        if len(here):
            toks = store.tokens(start, stop)
            rows.update({int(c): toks[c - start] for c in here})
    windows, peaks = [], []
    for c, p in addrs.tolist():
        lo, hi = max(0, p - WINDOW_BEFORE), min(T, p + WINDOW_AFTER + 1)
        windows.append(rows[c][lo:hi].tolist())
        peaks.append(p - lo)
    return windows, peaks


def page_data(report: dict, tops: list[SparseTopN], store: Any) -> tuple[dict, list[int]]:
    """The data script's object, and every token id it mentions (for the vocab)."""
    levels = report["levels"]
    paths = [s["path"] for s in report["saes"]]
    contexts, ids = {}, set()
    for s, latents in enumerate(_shown_latents(levels, paths)):
        for latent in sorted(latents):
            vals, addr = tops[s].of(latent)
            windows, peaks = context_windows(store, addr)
            ids.update(t for w in windows for t in w)
            contexts[f"{s}/{latent}"] = {
                "values": [float(v) for v in vals],
                "contexts": addr[:, 0].tolist(),
                "positions": addr[:, 1].tolist(),
                "windows": windows,
                "peaks": peaks,
            }
    data = {
        "title": f"split trees · {report['store']} · {report['hook']}",
        "saes": [{**s, "name": Path(s["path"]).name} for s in report["saes"]],
        "verdict": report.get("verdict"),
        "seed_pairs": [
            {**sp, "a": paths.index(sp["a"]), "b": paths.index(sp["b"])}
            for sp in report.get("seed_pairs", [])
        ],
        "levels": [
            {
                "narrow": paths.index(lv["narrow"]),
                "wide": paths.index(lv["wide"]),
                "summary": lv["summary"],
                "found_again": lv.get("found_again"),
                "seed_baseline": lv.get("seed_baseline"),
                "sibling_histogram": lv["sibling_histogram"],
                "parents": [p for p in lv["parents"] if p["children"]],
            }
            for lv in levels
        ],
        "contexts": contexts,
    }
    return data, sorted(ids)


def write_split_pages(
    out: str | Path,
    report: dict,
    tops: list[SparseTopN],
    store: Any,
    decode: Any,
    families: dict | None = None,
    absorbed: list[dict] | None = None,
) -> Path:
    """Write the pages into `out` (the splitting report dir); `decode(ids) -> list[str]`, or None for a store
    without a tokenizer; `families`: the embedded family pages (`split_families.embed`); `absorbed`: the
    recovery reports' absorbed parents (`split_absorption.absorption_data`). Returns the index.html path."""
    root = Path(out)
    data, ids = page_data(report, tops, store)
    data["has_frontier_png"] = (root / "frontier.png").exists()
    data["families"] = families
    data["absorbed"] = absorbed or []
    vocab = dict(zip(map(str, ids), decode(ids))) if decode is not None else {}
    return write_page(root, "splits", "setSplits", data, vocab)


def tokenizer_decode(store: Any) -> Any:
    """`decode(ids) -> texts` with the tokenizer of the store's model, or None for a store with no model."""
    if store.info.is_synthetic:
        return None
    from transformers import AutoTokenizer

    from saepipe.harvest.models import local_checkpoint

    name = store.info.model_name
    local = local_checkpoint(name)
    tok = AutoTokenizer.from_pretrained(str(local) if local is not None else name)
    return lambda ids: [tok.decode([i]) for i in ids]
