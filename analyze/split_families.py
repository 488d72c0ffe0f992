"""Split families inside the split-tree pages (issue 13): `saepipe splitting --families DIR`.

Why: a split tree shows a parent cut into children; a families report shows children put back together.
Read side by side they answer whether a cut-back undoes a split. The families report's pages (already
written by `saepipe families`, with the top contexts it collected) are copied into the split report as
`families/`, and both sides link: the split-tree index lists the cuts, a child of the families' wide SAE
links its family, and a family page links back to its parent's split tree (`families/data/links.js`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from saepipe.analyze.page_assets import write_data_script
from saepipe.errors import SaepipeError

SUBDIR = "families"
LINKS = "links.js"


def read_families(path: str) -> dict:
    """The families report in `path` (a `saepipe families` output dir with its pages), or one-line error."""
    root = Path(path)
    try:
        report = json.loads((root / "families.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SaepipeError(
            f"--families {path}: no readable families.json there ({type(e).__name__}); "
            "give the output dir of `saepipe families`"
        ) from None
    if not (root / "index.html").exists():
        raise SaepipeError(
            f"--families {path}: it has no pages (index.html); rerun `saepipe families` with --pages"
        )
    return report


def split_level(levels: list[dict], families: dict) -> int | None:
    """The split-tree level a family's ladder parent lives on: the one whose narrow SAE is the families'
    narrowest ladder SAE (`ladder` holds the parents); None without a ladder or such a level."""
    if not families["ladder"]:
        return None
    narrowest = Path(families["ladder"][0]["path"]).resolve()
    return next((a for a, lv in enumerate(levels) if Path(lv["narrow"]).resolve() == narrowest), None)


def page_links(href: str | None, level: int | None) -> dict:
    """What a family page links to: the split-tree index (the header's link back) and the level its parents
    are on (each parent's own tree), or nothing."""
    return {"splits": None if href is None else {"href": href, "level": level}}


def write_links(root: Path, links: dict) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    write_data_script(root / "data" / LINKS, "setLinks", links)


def embed(families_dir: str, split_out: Path, report: dict, families: dict) -> dict:
    """Copy the family pages into `split_out/families`, linked back to the split trees; returns what the
    split pages need: the cuts, and per cut the family of each wide-SAE latent in a family of two or more."""
    src, dst = Path(families_dir), split_out / SUBDIR
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copy2(src / "index.html", dst / "index.html")
    shutil.copytree(src / "assets", dst / "assets")
    (dst / "data").mkdir()
    for name in ("families.js", "vocab.js"):
        shutil.copy2(src / "data" / name, dst / "data" / name)
    level = split_level(report["levels"], families)
    write_links(dst, page_links("../index.html", level))
    paths = [Path(s["path"]).resolve() for s in report["saes"]]
    wide = Path(families["sae"]).resolve()
    return {
        "href": f"{SUBDIR}/index.html",
        "sae": paths.index(wide) if wide in paths else None,
        "name": Path(families["sae"]).name,
        "cuts": [{k: c[k] for k in ("name", "n_families", "n_merged", "largest")} for c in families["cuts"]],
        "member": [
            {str(m["latent"]): f["family"] for f in c["families"] if f["size"] > 1 for m in f["members"]}
            for c in families["cuts"]
        ],
    }
