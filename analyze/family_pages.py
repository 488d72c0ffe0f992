"""Family pages: the static site beside families.json (issue 13), in the style of the split-tree pages.

Why: a family's numbers say that latents i, j, k were put back together; only their top contexts side by
side, next to the merged latent's own and the ladder parent's, say whether they should have been.
`write_family_pages` writes, in the `saepipe families` report dir:

    index.html, assets/dashboard.css, assets/families.js
    data/families.js  SAEPIPE.setFamilies({...}): the trade-off rows, per cut its summary and its families
                      of two or more latents (statistics, members with weight / cosine / firing), and the
                      top contexts of every shown latent keyed "w/<latent>" (wide SAE), "p/<latent>"
                      (ladder parent) and "f<cut>/<family>" (the exact family code)
    data/vocab.js     SAEPIPE.setVocab({id: text}) as on the split-tree pages

Routes: `#` the trade-off table and the cuts, `#cut/C` one cut's families, `#cut/C/family/F` one family
with the merged latent, the parent and every member side by side. With `saepipe families --splitting DIR`
a family's page links its parent's split tree (DIR/index.html#level/A/parent/I).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from saepipe.analyze.dashboard import _script
from saepipe.analyze.dashboard_assets import DASHBOARD_CSS, JS_HELPERS
from saepipe.analyze.split_pages import SPLITS_CSS, SparseTopN, _windows


def _contexts(top: SparseTopN, latent: int, store: Any, ids: set) -> dict:
    vals, addr = top.of(latent)
    windows, peaks = _windows(store, addr)
    ids.update(t for w in windows for t in w)
    return {"values": [float(v) for v in vals], "contexts": addr[:, 0].tolist(), "positions": addr[:, 1].tolist(),
            "windows": windows, "peaks": peaks}  # fmt: skip


def _split_link(out: Path, splitting: str | None, report: dict) -> dict | None:
    """Where the parent split trees are: {"href": relative index.html, "level": A} for the level whose narrow
    SAE is the ladder's narrowest, or None."""
    if not splitting or not report["ladder"]:
        return None
    try:
        splits = json.loads((Path(splitting) / "splits.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    narrowest = str(Path(report["ladder"][0]["path"]).resolve())
    for a, lv in enumerate(splits.get("levels", [])):
        if str(Path(lv["narrow"]).resolve()) == narrowest:
            return {"href": os.path.relpath(Path(splitting) / "index.html", out), "level": a}
    return None


def page_data(
    report: dict, tops_wide, tops_parent, tops_family, store: Any, out: Path, splitting: str | None
):
    """The data script's object and every token id it mentions."""
    contexts: dict[str, dict] = {}
    ids: set[int] = set()
    cuts = []
    for c, cut in enumerate(report["cuts"]):
        multi = [f for f in cut["families"] if f["size"] > 1]
        multi.sort(key=lambda f: (-f["size"], -f["mass"]))
        for f in multi:
            contexts[f"f{c}/{f['family']}"] = _contexts(tops_family[c], f["family"], store, ids)
            for mem in f["members"]:
                key = f"w/{mem['latent']}"
                if key not in contexts:
                    contexts[key] = _contexts(tops_wide, mem["latent"], store, ids)
            if "parent" in f and tops_parent is not None:
                key = f"p/{f['parent']['latent']}"
                if key not in contexts:
                    contexts[key] = _contexts(tops_parent, f["parent"]["latent"], store, ids)
        summary = {k: v for k, v in cut.items() if k != "families"}
        cuts.append(summary | {"families": multi})
    data = {
        "title": f"split families · {Path(report['sae']).name} · {report['store']} · {report['hook']}",
        "sae": report["sae"],
        "n_latents": report["n_latents"],
        "ladder": report["ladder"],
        "tradeoff": report["tradeoff"],
        "cuts": cuts,
        "contexts": contexts,
        "splitting": _split_link(out, splitting, report),
    }
    return data, sorted(ids)


def write_family_pages(
    out: str | Path,
    report: dict,
    tops_wide,
    tops_parent,
    tops_family,
    store: Any,
    decode: Any,
    splitting=None,
) -> Path:
    """Write the pages into `out`; `decode(ids) -> texts`, or None for a store without a tokenizer."""
    root = Path(out)
    (root / "assets").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    (root / "assets" / "dashboard.css").write_text(DASHBOARD_CSS + SPLITS_CSS, encoding="utf-8")
    (root / "assets" / "families.js").write_text(FAMILIES_JS, encoding="utf-8")
    data, ids = page_data(report, tops_wide, tops_parent, tops_family, store, root, splitting)
    vocab = dict(zip(map(str, ids), decode(ids))) if decode is not None else {}
    _script(root / "data" / "families.js", "setFamilies", data)
    _script(root / "data" / "vocab.js", "setVocab", vocab)
    index = root / "index.html"
    index.write_text(FAMILIES_HTML, encoding="utf-8")  # last: the page exists only once its data does
    return index


FAMILIES_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>saepipe split families</title>
<link rel="stylesheet" href="assets/dashboard.css">
<script src="assets/families.js"></script>
<script src="data/families.js"></script>
<script src="data/vocab.js"></script>
</head><body>
<header><a href="#" class="home">saepipe split families</a> <span id="meta"></span></header>
<main id="app"><p>Loading…</p></main>
<script>SAEPIPE.start();</script>
</body></html>
"""

FAMILIES_JS = (
    r"""
"use strict";
const SAEPIPE = (function () {
  const S = { vocab: {} };
  S.setFamilies = d => { S.d = d; };
  S.setVocab = v => { S.vocab = v; };
"""
    + JS_HELPERS
    + r"""
  const pct = x => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
  const num = x => (x === null || x === undefined ? "–" : fmt(x));

  function contextRows(key) {
    const c = S.d.contexts[key], box = el("div", { class: "contexts" });
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
    const cols = ["name", "role", "architecture", "d_sae", "l0", "fvu", "firing_f1", "loss_recovered"];
    const trade = el("table", { id: "tradeoff" }, el("tr", {}, ...cols.map(h => el("th", { text: h }))),
      ...d.tradeoff.map(r => el("tr", {}, ...cols.map(k => el("td", { text: typeof r[k] === "number" && k !== "d_sae" ? num(r[k]) : (r[k] === undefined ? "–" : String(r[k])) })))));
    const cuts = el("table", { id: "cuts" }, el("tr", {}, ...["cut", "families", "of two or more", "largest", "median sibling co-firing", "median energy kept"].map(h => el("th", { text: h }))),
      ...d.cuts.map((c, i) => el("tr", { "data-cut": i }, el("td", {}, el("a", { href: "#cut/" + i, text: c.name })), el("td", { text: c.n_families }),
        el("td", { text: c.n_merged }), el("td", { text: c.largest }), el("td", { text: pct(c.median_sibling_cofire) }), el("td", { text: pct(c.median_energy_kept) }))));
    app.replaceChildren(el("h2", { text: "What merging costs and buys (same tokens)" }), trade, el("h2", { text: "Cuts" }), cuts);
  }

  function renderCut(c) {
    const app = document.getElementById("app"), cut = S.d.cuts[c];
    if (!cut) { app.textContent = "No cut " + c; return; }
    const head = ["family", "size", "members", "fires", "siblings co-fire", "energy kept", "parent", "parent mass covered", "firing F1"];
    app.replaceChildren(el("p", {}, el("a", { href: "#", text: "← all cuts" })),
      el("h2", { text: cut.name + ": " + cut.n_merged + " families of two or more latents" }),
      el("table", { class: "families", "data-cut": c }, el("tr", {}, ...head.map(h => el("th", { text: h }))),
        ...cut.families.map(f => el("tr", { "data-family": f.family },
          el("td", {}, el("a", { href: "#cut/" + c + "/family/" + f.family, text: String(f.family) })), el("td", { text: f.size }),
          el("td", { text: f.members.map(m => m.latent).join(", ") }), el("td", { text: f.fires }), el("td", { text: pct(f.sibling_cofire) }),
          el("td", { text: pct(f.energy_kept) }), el("td", { text: f.parent ? f.parent.latent : "–" }),
          el("td", { text: pct(f.parent_mass_covered) }), el("td", { text: num(f.firing_f1) })))));
  }

  function renderFamily(c, i) {
    const app = document.getElementById("app"), cut = S.d.cuts[c];
    const f = cut && cut.families.find(q => q.family === i);
    if (!f) { app.textContent = "No family " + i + " of two or more latents in cut " + c; return; }
    const merged = el("div", { class: "latent merged", "data-key": "f" + c + "/" + i },
      el("h3", { text: "merged latent " + i }), el("p", { class: "muted", text: cut.name + " (exact family code)" }),
      statTable([["members", f.size], ["fires", f.fires], ["siblings co-fire", pct(f.sibling_cofire)], ["energy kept", pct(f.energy_kept)],
        ["firing F1 of the merged dir", num(f.firing_f1)]]), contextRows("f" + c + "/" + i));
    const cols = [merged];
    if (f.parent) {
      const link = S.d.splitting ? el("a", { href: S.d.splitting.href + "#level/" + S.d.splitting.level + "/parent/" + f.parent.latent, text: "split tree" }) : "";
      cols.push(el("div", { class: "latent parent", "data-key": "p/" + f.parent.latent },
        el("h3", { text: "parent " + f.parent.latent }), el("p", { class: "muted" }, "ladder: " + S.d.ladder[0].path + " ", link),
        statTable([["cosine to family direction", num(f.parent.cos)], ["parent mass covered", pct(f.parent_mass_covered)]]),
        contextRows("p/" + f.parent.latent)));
    }
    f.members.forEach(m => cols.push(el("div", { class: "latent member", "data-key": "w/" + m.latent },
      el("h3", { text: "latent " + m.latent }), el("p", { class: "muted", text: "wide SAE" }),
      statTable([["weight w", num(m.weight)], ["cosine to family direction", num(m.cos)], ["fires", m.fires]]),
      contextRows("w/" + m.latent))));
    app.replaceChildren(el("p", {}, el("a", { href: "#cut/" + c, text: "← " + cut.name })),
      el("h2", { id: "family-title", text: "Family " + i + ": " + f.size + " latents" }), el("div", { class: "cols", id: "family" }, ...cols));
  }

  function route() {
    let m = location.hash.match(/^#cut\/(\d+)\/family\/(\d+)$/);
    if (m) renderFamily(parseInt(m[1], 10), parseInt(m[2], 10));
    else if ((m = location.hash.match(/^#cut\/(\d+)$/))) renderCut(parseInt(m[1], 10));
    else renderIndex();
    window.scrollTo(0, 0);
  }

  S.start = function () {
    if (!S.d) { document.getElementById("app").textContent = "Report data missing (data/families.js)."; return; }
    document.getElementById("meta").textContent = S.d.title;
    window.addEventListener("hashchange", route);
    route();
    document.body.dataset.ready = "1";
  };
  return S;
})();
"""
)
