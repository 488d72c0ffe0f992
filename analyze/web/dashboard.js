
"use strict";
const SAEPIPE = (function () {
  const S = { shards: {}, waiting: {}, shown: 100, key: null };
  S.setIndex = d => { S.idx = d; };
  S.setVocab = v => { S.vocab = v; };
  S.setShard = (n, d) => { S.shards[n] = d; (S.waiting[n] || []).forEach(f => f()); delete S.waiting[n]; };
/*@helpers*/
  function loadShard(n, cb) {
    if (S.shards[n]) return cb();
    const first = !S.waiting[n];
    (S.waiting[n] = S.waiting[n] || []).push(cb);
    if (!first) return;
    const s = el("script", { src: "data/shard_" + String(n).padStart(5, "0") + ".js" });
    s.onerror = () => { document.getElementById("app").textContent = "Could not load shard " + n; };
    document.head.append(s);
  }

  function matches(i, q) {
    const c = S.idx.columns;
    if (/^#?\d+$/.test(q)) return i === parseInt(q.replace("#", ""), 10);
    q = q.toLowerCase();
    const toks = [c.peak_token[i], ...c.promoted[i]].filter(t => t >= 0).map(t => tok(t).toLowerCase());
    if (c.explanation && c.explanation[i].toLowerCase().includes(q)) return true;
    return toks.some(t => t.includes(q));
  }

  // order of the list: "rank:<key>" (a ranking key: its ranked latents) or "col:<name>" (every latent
  // with a value in that score column, highest first; clicking a column header picks it too)
  function orderedIds() {
    const idx = S.idx, [kind, name] = S.order.split(":");
    if (kind === "rank") return idx.ranking[name];
    const col = idx.columns[name], ids = [];
    for (let i = 0; i < idx.n_latents; i++) if (col[i] !== null && !Number.isNaN(col[i])) ids.push(i);
    return ids.sort((a, b) => (col[b] - col[a]) || (a - b));
  }

  function renderList() {
    const app = document.getElementById("app"), idx = S.idx, c = idx.columns;
    S.order = S.order || "rank:" + idx.rank_by;
    const search = el("input", { id: "search", placeholder: "latent id, a word of its explanation, or a token it peaks on / promotes" });
    search.value = S.query || "";
    const select = el("select", { id: "rankby" });
    for (const k of idx.ranking_keys) select.append(el("option", { value: "rank:" + k, text: "rank by " + k }));
    for (const k of idx.score_columns) select.append(el("option", { value: "col:" + k, text: "sort by " + k }));
    select.value = S.order;
    const tbody = el("tbody", { id: "rows" });
    const more = el("button", { id: "more", text: "show more" });
    const count = el("span", { id: "count", class: "muted" });
    const info = idx.ranking_info || {};
    const ties = info.ranked !== undefined ? el("span", { id: "ties", class: "muted",
      text: "ranked by " + info.key + ": " + info.ranked + " latents, " + info.tied + " tied, " + info.unscored + " unscored" }) : "";
    const shownCols = ["detection_auroc", "fuzzing_auroc", "simulation"].filter(k => idx.score_columns.includes(k));
    const heads = [["#"], ["latent"], ["score"], ["explanation"], ...shownCols.map(k => [k.replace("_auroc", " AUROC"), k]),
      ["density", "density"], ["max", "max"], ["peak token"], ["promotes"]];
    const table = el("table", { id: "latents" },
      el("thead", {}, el("tr", {}, ...heads.map(([h, col]) => {
        const th = el("th", { text: h });
        if (col) { th.className = "sortable"; th.dataset.sort = col; th.onclick = () => { S.order = "col:" + col; select.value = S.order; fill(); }; }
        return th;
      }))), tbody);
    function fill() {
      const q = search.value.trim();
      S.query = q;
      let ids = orderedIds();
      const rankOf = new Map(ids.map((x, r) => [x, r]));
      if (q) {
        const all = [];
        for (let i = 0; i < idx.n_latents; i++) if (matches(i, q)) all.push(i);
        const at = x => (rankOf.has(x) ? rankOf.get(x) : 1e9 + x);
        ids = all.sort((a, b) => at(a) - at(b));
      }
      const [kind, name] = S.order.split(":"), scoreCol = kind === "rank" ? "score_" + name : name;
      tbody.replaceChildren();
      const frag = document.createDocumentFragment();
      for (const i of ids.slice(0, S.shown)) {
        const r = rankOf.get(i), rank = r !== undefined ? String(r + 1) : (c.dead[i] ? "dead" : c.dense[i] ? "dense" : "");
        const expl = c.explanation ? c.explanation[i] : "";
        frag.append(el("tr", { "data-latent": i },
          el("td", { text: rank }), el("td", {}, el("a", { href: "#latent/" + i, text: String(i) })),
          el("td", { class: "score", text: fmt(c[scoreCol][i]) }), el("td", { class: "expl", text: expl, title: expl }),
          ...shownCols.map(k => el("td", { text: fmt(c[k][i], 3) })),
          el("td", { text: fmt(c.density[i], 3) }),
          el("td", { text: fmt(c.max[i]) }), el("td", { class: "tokcell", text: c.peak_token[i] >= 0 ? shown(tok(c.peak_token[i])) : "" }),
          el("td", { class: "tokcell", text: c.promoted[i].map(t => shown(tok(t))).join(" · ") })));
      }
      tbody.append(frag);
      count.textContent = Math.min(S.shown, ids.length) + " of " + ids.length + " shown";
      more.style.display = ids.length > S.shown ? "" : "none";
    }
    search.oninput = () => { S.shown = 100; fill(); };
    select.onchange = () => { S.order = select.value; fill(); };
    more.onclick = () => { S.shown += 500; fill(); };
    const idLinks = ids => el("p", { class: "ids" }, ...ids.slice(0, 2000).map(i => el("a", { href: "#latent/" + i, text: String(i) })));
    app.replaceChildren(el("div", { class: "controls" }, search, select, count, ties), table, more,
      el("h3", { text: "Dead latents (" + idx.dead.length + ", never active on the analyzed tokens)" }), idLinks(idx.dead),
      el("h3", { text: "Ultra-dense latents (" + idx.dense.length + ", active on more than " + idx.dense_threshold * 100 + "% of tokens)" }), idLinks(idx.dense));
    fill();
  }

  function contextRow(cs, j, max) {
    const W = cs.window, toks = cs.tokens.subarray(j * W, (j + 1) * W), acts = cs.acts.subarray(j * W, (j + 1) * W);
    const div = el("div", { class: "ctx", "data-context": cs.contexts[j], "data-position": cs.positions[j] });
    div.append(el("span", { class: "val", text: fmt(cs.values[j]) }));
    for (let w = 0; w < W; w++) {
      if (toks[w] < 0) continue;
      const pred = cs.predicted ? cs.predicted[j * W + w] : 0;
      const a = acts[w], span = el("span", { class: "tok" + (w === cs.before ? " peak" : "") + (pred > 0 ? " pred" : ""), text: shown(tok(toks[w])) });
      if (pred > 0) span.dataset.pred = String(pred);
      if (!Number.isNaN(a)) {
        span.dataset.act = String(a);
        span.title = "activation " + fmt(a, 6);
        if (a > 0) span.style.background = "rgba(232,116,47," + Math.min(1, a / max).toFixed(3) + ")";
      } else span.title = "no activation (BOS)";
      div.append(span);
    }
    return div;
  }

  function unpack(cs, W, before) {
    return { window: W, before, values: decode(cs.values, Float32Array), contexts: cs.contexts, positions: cs.positions,
      tokens: decode(cs.tokens, Int32Array), acts: decode(cs.acts, Float32Array),
      predicted: cs.predicted ? decode(cs.predicted, Float32Array) : null };
  }

  function explanationBlock(i, d) {
    const c = S.idx.columns, box = el("div", { id: "explanation" });
    if (!c.explanation) return box;
    box.append(el("h3", { text: "Explanation (n-grams, built from top and sampled contexts in even contexts)" }),
      el("p", { class: "explanation", id: "explanation-text", text: c.explanation[i] || "none" }));
    if (d.patterns.length) box.append(el("table", { id: "patterns" },
      el("tr", {}, ...["n-gram", "predicts", "share of activation", "precision"].map(h => el("th", { text: h }))),
      ...d.patterns.map(([t, p, sh, pr]) => el("tr", {}, el("td", { class: "tokcell", text: shown(t) }),
        el("td", { text: fmt(p) }), el("td", { text: fmt(sh, 3) }), el("td", { text: fmt(pr, 3) })))));
    const rows = [["score (mean of the three, chance 0)", "score_explanation"], ...S.idx.score_columns.map(k => [k, k])];
    box.append(el("h4", { text: "Scores on held-out contexts (odd contexts)" }), el("table", { id: "scores" },
      ...rows.filter(([, k]) => k in c).map(([h, k]) => el("tr", { "data-score": k }, el("th", { text: h }), el("td", { text: fmt(c[k][i]) })))));
    if (c.lm_explanation && c.lm_explanation[i]) box.append(el("h4", { text: "Language model's explanation" }),
      el("p", { class: "explanation", id: "lm-explanation", text: c.lm_explanation[i] }));
    return box;
  }

  function histogram(counts, edges) {
    let lo = counts.findIndex(x => x > 0), hi = counts.length - 1 - [...counts].reverse().findIndex(x => x > 0);
    if (lo < 0) return el("p", { class: "muted", text: "never active" });
    const n = hi - lo + 1, w = 560 / n, top = Math.max(...counts);
    const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", 600); svg.setAttribute("height", 150); svg.setAttribute("id", "histogram");
    for (let b = lo; b <= hi; b++) {
      const h = 110 * counts[b] / top, r = document.createElementNS(ns, "rect");
      r.setAttribute("x", 20 + (b - lo) * w); r.setAttribute("y", 115 - h); r.setAttribute("width", Math.max(1, w - 1));
      r.setAttribute("height", h); r.setAttribute("class", "bar");
      const t = document.createElementNS(ns, "title");
      t.textContent = fmt(10 ** edges[b], 3) + " – " + fmt(10 ** edges[b + 1], 3) + ": " + counts[b]; r.append(t); svg.append(r);
    }
    for (const [b, anchor] of [[lo, "start"], [hi + 1, "end"]]) {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", 20 + (b - lo) * w); t.setAttribute("y", 135); t.setAttribute("text-anchor", anchor);
      t.textContent = fmt(10 ** edges[b], 3); svg.append(t);
    }
    return svg;
  }

  function renderLatent(i) {
    const app = document.getElementById("app"), idx = S.idx, c = idx.columns;
    if (!(i >= 0 && i < idx.n_latents)) { app.textContent = "No latent " + i; return; }
    app.replaceChildren(el("p", { text: "Loading latent " + i + "…" }));
    loadShard(Math.floor(i / idx.shard_size), () => {
      const d = S.shards[Math.floor(i / idx.shard_size)][i], W = idx.window.before + 1 + idx.window.after;
      const top = unpack(d.top, W, idx.window.before), low = unpack(d.low, W, idx.window.before);
      const held = unpack(d.heldout, W, idx.window.before);
      const max = c.max[i] > 0 ? c.max[i] : 1;
      const cls = c.dead[i] ? "dead" : c.dense[i] ? "ultra-dense" : c.rank[i] < 0 ? "not ranked by " + idx.rank_by : "rank " + (c.rank[i] + 1) + " by " + idx.rank_by;
      const stats = [["class", cls], ["density", fmt(c.density[i], 4)], ["active tokens", c.n_active[i]],
        ["mean", fmt(c.mean[i])], ["mean when active", fmt(c.mean_active[i])], ["max", fmt(c.max[i])],
        ...idx.ranking_keys.map(k => ["score " + k, fmt(c["score_" + k][i])])];
      const logit = (ids, vals, title) => el("div", {}, el("h4", { text: title }), el("table", {},
        ...ids.map((t, j) => el("tr", {}, el("td", { class: "tokcell", text: shown(tok(t)) }), el("td", { text: fmt(vals[j]) })))));
      const section = (title, cs, id) => {
        const box = el("div", { id });
        for (let j = 0; j < cs.values.length; j++) box.append(contextRow(cs, j, max));
        if (!cs.values.length) box.append(el("p", { class: "muted", text: "none" }));
        return [el("h3", { text: title }), box];
      };
      app.replaceChildren(
        el("p", {}, el("a", { href: "#", text: "← all latents" }), " ",
          i > 0 ? el("a", { href: "#latent/" + (i - 1), text: "‹ prev" }) : "", " ",
          i + 1 < idx.n_latents ? el("a", { href: "#latent/" + (i + 1), text: "next ›" }) : ""),
        el("h2", { id: "latent-title", text: "Latent " + i }),
        explanationBlock(i, d),
        el("div", { class: "cols" },
          el("div", {}, el("h3", { text: "Statistics" }), el("table", { id: "stats" }, ...stats.map(([k, v]) =>
            el("tr", {}, el("th", { text: k }), el("td", { text: String(v) }))))),
          el("div", {}, el("h3", { text: "Activation histogram (active tokens, log scale)" }), histogram(d.hist, idx.hist_edges)),
          el("div", { id: "logits" }, el("h3", { text: "Logit effects (direct path)" }), el("div", { class: "cols" },
            logit(d.logits.top_ids, d.logits.top_values, "promotes"), logit(d.logits.bottom_ids, d.logits.bottom_values, "suppresses")))),
        ...section("Top activations", top, "top"),
        ...section("Weakly active: uniformly sampled active tokens below the median", low, "low"),
        ...section("Held out: active windows the explanation is scored on (underlined: where it predicts activity)", held, "heldout"));
    });
  }

  function route() {
    const m = location.hash.match(/^#latent\/(\d+)$/);
    if (m) renderLatent(parseInt(m[1], 10)); else renderList();
    window.scrollTo(0, 0);
  }

  S.start = function () {
    if (!S.idx || !S.vocab) { document.getElementById("app").textContent = "Report data missing (data/index.js)."; return; }
    document.getElementById("meta").textContent = S.idx.title;
    window.addEventListener("hashchange", route);
    route();
    document.body.dataset.ready = "1";
  };
  return S;
})();
