
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

