
"use strict";
const SAEPIPE = (function () {
  const S = { vocab: {}, links: {} };
  S.setFamilies = d => { S.d = d; };
  S.setVocab = v => { S.vocab = v; };
  S.setLinks = l => { S.links = l; };
/*@helpers*/

  const pct = x => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
  const num = x => (x === null || x === undefined ? "–" : fmt(x));

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
        ["firing F1 of the merged dir", num(f.firing_f1)]]), contextRows(S.d.contexts["f" + c + "/" + i]));
    const cols = [merged];
    if (f.parent) {
      const sp = S.links.splits;
      const link = sp && sp.level !== null ? el("a", { href: sp.href + "#level/" + sp.level + "/parent/" + f.parent.latent, text: "split tree" }) : "";
      cols.push(el("div", { class: "latent parent", "data-key": "p/" + f.parent.latent },
        el("h3", { text: "parent " + f.parent.latent }), el("p", { class: "muted" }, "ladder: " + S.d.ladder[0].path + " ", link),
        statTable([["cosine to family direction", num(f.parent.cos)], ["parent mass covered", pct(f.parent_mass_covered)]]),
        contextRows(S.d.contexts["p/" + f.parent.latent])));
    }
    f.members.forEach(m => cols.push(el("div", { class: "latent member", "data-key": "w/" + m.latent },
      el("h3", { text: "latent " + m.latent }), el("p", { class: "muted", text: "wide SAE" }),
      statTable([["weight w", num(m.weight)], ["cosine to family direction", num(m.cos)], ["fires", m.fires]]),
      contextRows(S.d.contexts["w/" + m.latent]))));
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
    if (S.links.splits) document.querySelector("header").append(" ", el("a", { id: "to-splits", href: S.links.splits.href, text: "← split trees" }));
    window.addEventListener("hashchange", route);
    route();
    document.body.dataset.ready = "1";
  };
  return S;
})();
