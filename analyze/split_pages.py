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

Like the analyze dashboard it works from file:// with no server: data are scripts, routing is by hash
(`#` the levels and their parents, `#level/A/parent/I` one parent with its children).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from saepipe.analyze.dashboard import _script
from saepipe.analyze.dashboard_assets import DASHBOARD_CSS, JS_HELPERS
from saepipe.analyze.stats import WINDOW_AFTER, WINDOW_BEFORE


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


def _windows(store: Any, addrs: np.ndarray) -> tuple[list[list[int]], list[int]]:
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
            windows, peaks = _windows(store, addr)
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


def write_split_pages(out: str | Path, report: dict, tops: list[SparseTopN], store: Any, decode: Any) -> Path:
    """Write the pages into `out` (the splitting report dir); `decode(ids) -> list[str]`, or None for a store
    without a tokenizer. Returns the index.html path."""
    root = Path(out)
    (root / "assets").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    (root / "assets" / "dashboard.css").write_text(DASHBOARD_CSS + SPLITS_CSS, encoding="utf-8")
    (root / "assets" / "splits.js").write_text(SPLITS_JS, encoding="utf-8")
    data, ids = page_data(report, tops, store)
    data["has_frontier_png"] = (root / "frontier.png").exists()
    vocab = dict(zip(map(str, ids), decode(ids))) if decode is not None else {}
    _script(root / "data" / "splits.js", "setSplits", data)
    _script(root / "data" / "vocab.js", "setVocab", vocab)
    index = root / "index.html"
    index.write_text(SPLITS_HTML, encoding="utf-8")  # last: the page exists only once its data does
    return index


def tokenizer_decode(store: Any) -> Any:
    """`decode(ids) -> texts` with the tokenizer of the store's model, or None for a store with no model."""
    from saepipe.analyze.frontier import is_model_store

    if not is_model_store(store):
        return None
    from transformers import AutoTokenizer

    from saepipe.harvest.models import local_checkpoint

    name = store.info.model_name
    local = local_checkpoint(name)
    tok = AutoTokenizer.from_pretrained(str(local) if local is not None else name)
    return lambda ids: [tok.decode([i]) for i in ids]


SPLITS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>saepipe split trees</title>
<link rel="stylesheet" href="assets/dashboard.css">
<script src="assets/splits.js"></script>
<script src="data/splits.js"></script>
<script src="data/vocab.js"></script>
</head><body>
<header><a href="#" class="home">saepipe split trees</a> <span id="meta"></span></header>
<main id="app"><p>Loading…</p></main>
<script>SAEPIPE.start();</script>
</body></html>
"""

SPLITS_CSS = """
.cols > .latent { flex: 1 1 300px; min-width: 300px; }
.latent h3 { margin-bottom: 2px; }
.latent .ctx { font-size: 12px; }
.kind-clean { color: #2a7; } .kind-blurred { color: #c60; }
.verdict-bad { color: #b00; font-weight: bold; }
"""

SPLITS_JS = (
    r"""
"use strict";
const SAEPIPE = (function () {
  const S = { vocab: {} };
  S.setSplits = d => { S.d = d; };
  S.setVocab = v => { S.vocab = v; };
"""
    + JS_HELPERS
    + r"""
  const pct = x => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
  const KINDS = ["persists", "clean split", "blurred split", "dropped"];
  const share = (sum, k) => { const n = KINDS.reduce((t, q) => t + sum[q], 0); return n ? sum[k] / n : 0; };
  const kindClass = k => (k === "clean split" ? "kind-clean" : k === "blurred split" ? "kind-blurred" : "");
  const saeName = s => S.d.saes[s].name + " (" + S.d.saes[s].architecture + ", " + S.d.saes[s].d_sae + ")";

  function contextRows(sae, latent) {
    const c = S.d.contexts[sae + "/" + latent], box = el("div", { class: "contexts" });
    if (!c || !c.values.length) { box.append(el("p", { class: "muted", text: "never active" })); return box; }
    c.values.forEach((v, j) => {
      const div = el("div", { class: "ctx", "data-context": c.contexts[j], "data-position": c.positions[j], "data-value": String(v) });
      div.append(el("span", { class: "val", text: fmt(v) }));
      c.windows[j].forEach((t, w) => div.append(el("span", { class: "tok" + (w === c.peaks[j] ? " peak" : ""), "data-token": t, text: shown(tok(t)) })));
      box.append(div);
    });
    return box;
  }

  function statTable(rows) {
    return el("table", { class: "stats" }, ...rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: String(v) }))));
  }

  function renderIndex() {
    const app = document.getElementById("app"), d = S.d;
    const saes = el("table", { id: "saes" }, el("tr", {}, ...["SAE", "architecture", "width", "L0", "FVU", "loss recovered"].map(h => el("th", { text: h }))),
      ...d.saes.map(s => el("tr", {}, el("td", { text: s.name }), el("td", { text: s.architecture }), el("td", { text: s.d_sae }),
        el("td", { text: fmt(s.l0) }), el("td", { text: fmt(s.fvu) }), el("td", { text: s.loss_recovered === undefined ? "–" : fmt(s.loss_recovered) }))));
    const parts = [el("h2", { text: "SAEs" }), saes];
    if (d.has_frontier_png) parts.push(el("img", { src: "frontier.png", alt: "sparsity-reconstruction frontier", style: "max-width:100%" }));
    parts.push(el("h2", { text: "Seed stability" }));
    if (d.verdict) parts.push(el("p", { id: "verdict", class: d.verdict.readable === false ? "verdict-bad" : "verdict", text: d.verdict.message }));
    (d.seed_pairs || []).forEach(sp => {
      const st = sp.stability;
      parts.push(el("p", { class: "seed-pair", text: saeName(sp.a) + " vs " + saeName(sp.b) + ": " + pct(st.agreement) +
        " of latents found again at decoder |cos| > " + st.threshold + (st.weighted === null ? "" : " (" + pct(st.weighted) + " weighted by firing)") +
        "; random directions " + pct(st.baseline) + "; split-tree counts between the seeds: " +
        KINDS.map(k => sp.summary[k] + " " + k).join(", ") }));
    });
    d.levels.forEach((lv, a) => {
      const b = lv.seed_baseline;
      const sum = KINDS.map(k => lv.summary[k] + " " + k + " (" + pct(share(lv.summary, k)) + (b ? "; seeds " + pct(share(b.summary, k)) : "") + ")").join(", ") + ", " + lv.summary["new"] + " new";
      const found = lv.found_again ? pct(lv.found_again.agreement) + " of latents found again one width up" + (b ? " (two seeds of width " + b.d_sae + ": " + pct(b.stability.a_to_b) + ")" : "") : "";
      parts.push(el("h2", { text: saeName(lv.narrow) + " → " + saeName(lv.wide) }), el("p", { class: "muted level-summary", text: sum }), el("p", { class: "muted", text: found }));
      const parents = [...lv.parents].sort((x, y) => y.children.length - x.children.length || y.fires - x.fires);
      parts.push(el("table", { class: "parents", "data-level": a },
        el("tr", {}, ...["parent", "kind", "children", "fires", "coverage", "overlap", "siblings co-fire", "leak"].map(h => el("th", { text: h }))),
        ...parents.map(p => el("tr", { "data-latent": p.latent },
          el("td", {}, el("a", { href: "#level/" + a + "/parent/" + p.latent, text: String(p.latent) })),
          el("td", { class: kindClass(p.kind), text: p.kind }), el("td", { text: p.children.map(c => c.latent).join(", ") }),
          el("td", { text: p.fires }), el("td", { text: pct(p.coverage) }), el("td", { text: pct(p.overlap) }),
          el("td", { text: pct(p.sibling_cofire) }), el("td", { text: pct(p.leak) })))));
    });
    app.replaceChildren(...parts);
  }

  function renderParent(a, i) {
    const app = document.getElementById("app"), lv = S.d.levels[a];
    const p = lv && lv.parents.find(q => q.latent === i);
    if (!p) { app.textContent = "No parent " + i + " with children at level " + a; return; }
    const parentCol = el("div", { class: "latent parent", "data-latent": i },
      el("h3", { text: "parent " + i }), el("p", { class: "muted", text: saeName(lv.narrow) }),
      statTable([["kind", p.kind], ["fires", p.fires], ["coverage", pct(p.coverage)], ["overlap", pct(p.overlap)],
        ["siblings co-fire", pct(p.sibling_cofire)], ["leak", pct(p.leak)]]),
      contextRows(lv.narrow, i));
    const kids = p.children.map(c => el("div", { class: "latent child", "data-latent": c.latent },
      el("h3", { text: "child " + c.latent }), el("p", { class: "muted", text: saeName(lv.wide) }),
      statTable([["cosine to parent", fmt(c.cos)], ["share of parent's firing", pct(c.share)],
        ["within parent's firing", pct(c.containment)], ["fires", c.fires]]),
      contextRows(lv.wide, c.latent)));
    app.replaceChildren(el("p", {}, el("a", { href: "#", text: "← all parents" })),
      el("h2", { id: "parent-title", text: "Parent " + i + " → " + p.children.length + " children (" + p.kind + ")" }),
      el("div", { class: "cols", id: "family" }, parentCol, ...kids));
  }

  function route() {
    const m = location.hash.match(/^#level\/(\d+)\/parent\/(\d+)$/);
    if (m) renderParent(parseInt(m[1], 10), parseInt(m[2], 10)); else renderIndex();
    window.scrollTo(0, 0);
  }

  S.start = function () {
    if (!S.d) { document.getElementById("app").textContent = "Report data missing (data/splits.js)."; return; }
    document.getElementById("meta").textContent = S.d.title;
    window.addEventListener("hashchange", route);
    route();
    document.body.dataset.ready = "1";
  };
  return S;
})();
"""
)
