"""The HTML reports' static files (dashboard, split trees, split families) and their data scripts.

The pages, scripts and styles are package data in `analyze/web/` (shipped by pyproject's package-data),
copied into each report as they are. The pages work from file:// with no server and no network: data files
are plain scripts that call `SAEPIPE.set...` (file:// forbids fetch()), inserted with <script> tags.
Routing is by URL hash. The dashboard's shards hold base64 little-endian float32/int32 arrays, so a page
shows exactly the stored values.

`web/helpers.js` holds the DOM and formatting helpers every page's script shares; a script names the place
they go with a `/*@helpers*/` line (inside its closure, where `S.vocab` must be in scope for `tok`).
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from saepipe.files import write_text_atomic

HELPERS_MARK = "/*@helpers*/\n"


def asset(name: str) -> str:
    """The text of `web/<name>`, with the shared helpers spliced into a page script."""
    text = files("saepipe.analyze").joinpath("web", name).read_text(encoding="utf-8")
    if HELPERS_MARK in text:
        text = text.replace(HELPERS_MARK, asset("helpers.js"))
    return text


def write_asset(root: Path, rel: str, *names: str) -> None:
    """Write `root/rel` as the concatenation of the named assets (e.g. a page's base and own styles)."""
    (root / rel).write_text("".join(asset(n) for n in names), encoding="utf-8")


def write_data_script(path: Path, call: str, *args: Any) -> None:
    """A data file the page loads with a <script> tag: `SAEPIPE.<call>(<args as JSON>);`."""
    body = ", ".join(json.dumps(a, ensure_ascii=False, separators=(",", ":"), allow_nan=False) for a in args)
    write_text_atomic(path, f"SAEPIPE.{call}({body});\n", encoding="utf-8")


def write_page(root: Path, page: str, call: str, data: Any, vocab: dict) -> Path:
    """A split-tree or families page in `root`: the dashboard's styles plus the split pages' own, the
    page's script (`web/<page>.js`), its data (`SAEPIPE.<call>(data)`) and vocabulary, and index.html
    (`web/<page>.html`) last: the page exists only once its data does. Returns the index.html path."""
    (root / "assets").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    write_asset(root, "assets/dashboard.css", "dashboard.css", "splits.css")
    write_asset(root, f"assets/{page}.js", f"{page}.js")
    write_data_script(root / "data" / f"{page}.js", call, data)
    write_data_script(root / "data" / "vocab.js", "setVocab", vocab)
    write_asset(root, "index.html", f"{page}.html")
    return root / "index.html"
