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
    data/links.js     SAEPIPE.setLinks({splits: {href, level} or null}): the split trees it links to

Routes: `#` the trade-off table and the cuts, `#cut/C` one cut's families, `#cut/C/family/F` one family
with the merged latent, the parent and every member side by side. With `saepipe families --splitting DIR`
a family's page links its parent's split tree (DIR/index.html#level/A/parent/I) through data/links.js
(`SAEPIPE.setLinks`), which `saepipe splitting --families` rewrites when it embeds the pages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from saepipe.analyze.page_assets import write_page
from saepipe.analyze.split_families import page_links, split_level, write_links
from saepipe.analyze.split_pages import SparseTopN, context_windows


def _contexts(top: SparseTopN, latent: int, store: Any, ids: set) -> dict:
    vals, addr = top.of(latent)
    windows, peaks = context_windows(store, addr)
    ids.update(t for w in windows for t in w)
    return {"values": [float(v) for v in vals], "contexts": addr[:, 0].tolist(), "positions": addr[:, 1].tolist(),
            "windows": windows, "peaks": peaks}  # fmt: skip


def _split_links(out: Path, splitting: str | None, report: dict) -> dict:
    """What the pages link to (`page_links`): the split trees of `saepipe families --splitting DIR`, on the
    level that holds the ladder's parents; nothing without DIR or a readable splits.json there."""
    if not splitting:
        return page_links(None, None)
    try:
        splits = json.loads((Path(splitting) / "splits.json").read_text())
    except (OSError, json.JSONDecodeError):
        return page_links(None, None)
    return page_links(
        os.path.relpath(Path(splitting) / "index.html", out), split_level(splits["levels"], report)
    )


def page_data(report: dict, tops_wide, tops_parent, tops_family, store: Any):
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
    data, ids = page_data(report, tops_wide, tops_parent, tops_family, store)
    vocab = dict(zip(map(str, ids), decode(ids))) if decode is not None else {}
    write_links(root, _split_links(root, splitting, report))
    return write_page(root, "families", "setFamilies", data, vocab)
