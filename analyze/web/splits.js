
"use strict";
const SAEPIPE = (function () {
  const S = { vocab: {} };
  S.setSplits = d => { S.d = d; };
  S.setVocab = v => { S.vocab = v; };
/*@helpers*/

  const pct = x => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
  const KINDS = ["persists", "clean split", "blurred split", "dropped"];
  const share = (sum, k) => { const n = KINDS.reduce((t, q) => t + sum[q], 0); return n ? sum[k] / n : 0; };
  const kindClass = k => (k === "clean split" ? "kind-clean" : k === "blurred split" ? "kind-blurred" : "");
  const saeName = s => S.d.saes[s].name + " (" + S.d.saes[s].architecture + ", " + S.d.saes[s].d_sae + ")";

  function familyLinks(sae, latent) {  // the family pages' families this latent was merged into, one per cut
    const f = S.d.families;
    if (!f || f.sae !== sae) return "";
    const links = f.cuts.flatMap((c, i) => (String(latent) in f.member[i]
      ? [el("a", { class: "family-link", href: f.href + "#cut/" + i + "/family/" + f.member[i][latent], text: "family " + f.member[i][latent] + " (" + c.name + ")" }), " "] : []));
    return el("p", { class: "muted families-of" }, links.length ? "merged into: " : "in no family of two or more", ...links);
  }

  function treeHref(sae, latent) {  // this latent's split tree, where it is a parent with children
    const a = S.d.levels.findIndex(lv => lv.narrow === sae && lv.parents.some(p => p.latent === latent));
    return a < 0 ? null : "#level/" + a + "/parent/" + latent;
  }

  function latentLink(ab, latent) {  // to its split tree when it has one, else to its entry on the absorption page
    const tree = treeHref(ab.sae, latent);
    return el("a", { class: tree ? "tree-link" : "absorption-link", href: tree || ab.page + "#latent-" + latent, text: String(latent) });
  }

  function absorbedSection(ab) {
    const rows = ab.parents.map(p => el("tr", { "data-parent": p.parent },
      el("td", {}, el("a", { href: ab.page + "#parent-" + p.parent, text: String(p.parent) })),
      el("td", {}, latentLink(ab, p.latent)), el("td", { text: fmt(p.cos, 2) }), el("td", { text: pct(p.rate) }),
      el("td", { class: "takers" }, ...p.takers.flatMap(t => [latentLink(ab, t.latent), " (" + pct(t.share) + ") "]))));
    return [el("h3", { text: saeName(ab.sae) }),
      el("p", { class: "muted" }, "mean absorption over " + ab.n_parents + " parent features: " + pct(ab.rate) + "; the " + ab.parents.length +
        " most absorbed below (all of them: ", el("a", { href: ab.page, text: "absorption page" }), "). A latent links its split tree where it has one."),
      el("table", { class: "absorbed", "data-sae": ab.sae }, el("tr", {}, ...["parent feature", "its latent", "cos", "absorbed", "fired in its place (share of silent tokens)"].map(h => el("th", { text: h }))), ...rows)];
  }

  function absorbedBy(sae, latent) {  // the true parents this latent took the place of
    const took = S.d.absorbed.filter(ab => ab.sae === sae).flatMap(ab => ab.parents.flatMap(p => p.takers.filter(t => t.latent === latent)
      .map(t => [el("a", { class: "absorbed-link", href: ab.page + "#parent-" + p.parent, text: "feature " + p.parent }), " (" + pct(t.share) + ") "])));
    return took.length ? el("p", { class: "muted absorbed-of" }, "fired in place of absorbed parent ", ...took.flat()) : "";
  }

  function familiesSection(f) {
    return [el("h2", { text: "Split families of " + f.name }),
      el("p", { class: "muted", text: "The latents of " + f.name + " put back together (saepipe families); each child below links its family." }),
      el("table", { id: "family-cuts" }, el("tr", {}, ...["cut", "families", "of two or more", "largest"].map(h => el("th", { text: h }))),
        ...f.cuts.map((c, i) => el("tr", {}, el("td", {}, el("a", { href: f.href + "#cut/" + i, text: c.name })),
          el("td", { text: c.n_families }), el("td", { text: c.n_merged }), el("td", { text: c.largest }))))];
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
    if (d.families) parts.push(...familiesSection(d.families));
    if (d.absorbed.length) parts.push(el("h2", { text: "Absorbed parents (ground truth)" }), ...d.absorbed.flatMap(absorbedSection));
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
      familyLinks(lv.narrow, i), absorbedBy(lv.narrow, i), contextRows(S.d.contexts[lv.narrow + "/" + i]));
    const kids = p.children.map(c => el("div", { class: "latent child", "data-latent": c.latent },
      el("h3", { text: "child " + c.latent }), el("p", { class: "muted", text: saeName(lv.wide) }),
      statTable([["cosine to parent", fmt(c.cos)], ["share of parent's firing", pct(c.share)],
        ["within parent's firing", pct(c.containment)], ["fires", c.fires]]),
      familyLinks(lv.wide, c.latent), absorbedBy(lv.wide, c.latent), contextRows(S.d.contexts[lv.wide + "/" + c.latent])));
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
