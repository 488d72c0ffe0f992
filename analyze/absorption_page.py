"""A static page beside a recovery report: every parent feature, how often its latent goes silent where its
children are, and links to the latents that fired in its place.

Why: a recovery table says how many parents are lost; a researcher then asks which latents absorbed them
and what those latents are. `saepipe recovery --out R.json` writes R.html (works from file://, no
server): parents sorted by absorption rate, each taker linking to its latent's entry, which names the
true feature the latent matches best (by decoder cosine) and the parents it took over from.
"""

from __future__ import annotations

import html
from pathlib import Path

STYLE = """body{font:14px system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}
td,th{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}.bar{display:inline-block;height:.7em;background:#c0392b;vertical-align:middle}"""


def _latent_link(latent: int) -> str:
    return f'<a href="#latent-{latent}">latent {latent}</a>'


def absorption_html(report: dict, title: str) -> str:
    """The page for one recovery report (the dict `saepipe recovery --out` writes)."""
    rows = sorted(report["absorption"], key=lambda r: -(r["absorption_rate"] if r["child_tokens"] else -1))
    per_latent = report["per_latent"]
    best_cos = report["per_feature"]["best_cos"]
    took: dict[int, list[tuple[int, float]]] = {}
    body = []
    for r in rows:
        rate = r["absorption_rate"] if r["child_tokens"] else None
        takers = ", ".join(
            f"{_latent_link(t['latent'])} ({t['fraction_of_silent']:.0%} of silent, cos to parent "
            f"{t['cos_to_parent']:.2f})"
            for t in r["takers"]
        )
        for t in r["takers"]:
            took.setdefault(t["latent"], []).append((r["parent"], t["fraction_of_silent"]))
        bar = f'<span class="bar" style="width:{4 * (rate or 0):.2f}em"></span>' if rate is not None else ""
        body.append(
            f'<tr id="parent-{r["parent"]}"><td>{r["parent"]}</td><td>{_latent_link(r["parent_latent"])}</td>'
            f"<td>{r['parent_latent_cos']:.2f}</td><td>{best_cos[r['parent']]:.2f}</td><td>{r['child_tokens']:,}</td>"
            f"<td>{'–' if rate is None else f'{rate:.3f}'} {bar}</td><td class=l>{takers}</td></tr>"
        )
    latents = sorted(took | {r["parent_latent"]: took.get(r["parent_latent"], []) for r in rows})
    entries = []
    for lat in latents:
        feat, f1 = per_latent["cos_feature"][lat], per_latent["cos_f1"][lat]
        parents = ", ".join(
            f'<a href="#parent-{p}">feature {p}</a> ({share:.0%})' for p, share in took.get(lat, [])
        )
        entries.append(
            f'<tr id="latent-{lat}"><td>{lat}</td><td>{per_latent["fires"][lat]:,}</td><td>{feat}</td>'
            f"<td>{f1:.3f}</td><td class=l>{parents or '–'}</td></tr>"
        )
    summary = (
        f"recovered {report['fraction_recovered']:.1%} of features at cos &ge; 0.9; MCC {report['mcc']:.3f}; "
        f"F1 {report['f1']:.3f}; mean absorption rate over parents {report['absorption_rate']:.3f}"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body><h1>Absorption: {html.escape(title)}</h1><p>{summary}</p>
<h2>Parent features, most absorbed first</h2>
<p>rate: of the tokens where a child of the parent is present, the fraction where the parent's latent
(its best-cosine latent) is silent. Takers: the latents firing most often on those tokens.</p>
<table><tr><th>parent feature</th><th>its latent</th><th>cos</th><th>best cos</th><th>child tokens</th>
<th>absorption rate</th><th class=l>fired in its place</th></tr>
{"".join(body)}</table>
<h2>Latents</h2>
<table><tr><th>latent</th><th>fires</th><th>best-cos feature</th><th>F1 on it</th>
<th class=l>took over from</th></tr>
{"".join(entries)}</table></body></html>
"""


def write_absorption_page(report: dict, json_path: str | Path, title: str) -> Path:
    """Write the page beside `json_path` (same name, .html) and return its path."""
    path = Path(json_path).with_suffix(".html")
    path.write_text(absorption_html(report, title))
    return path
