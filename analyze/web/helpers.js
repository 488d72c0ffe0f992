
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v; else if (k === "html") e.innerHTML = v; else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k);
    return e;
  };
  const tok = id => (id in S.vocab ? S.vocab[id] : "⟨" + id + "⟩");
  const shown = s => s.replace(/\n/g, "↵");
  const fmt = (x, d) => (x === null || Number.isNaN(x) ? "–" : Number(x).toPrecision(d || 4));
  function decode(b64, Type) {
    const s = atob(b64), u = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
    return new Type(u.buffer);
  }
  function contextRows(c) {  // one latent's top contexts (`S.d.contexts[...]`), the peak token marked
    const box = el("div", { class: "contexts" });
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
