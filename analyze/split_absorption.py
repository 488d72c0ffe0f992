"""Absorbed parents inside the split-tree pages (issue 12): `saepipe splitting --recovery R.json ...`.

Why: on a synthetic set the truth says which parent features an SAE lost and which latents fired in their
place (`saepipe recovery`, its absorption table); the split trees say what those latents became one width
up. Shown together, a researcher follows a lost parent to the latent that absorbed it and on to that
latent's split tree. Each recovery report names its SAE (`sae` in the JSON); its full absorption page
(R.html, beside R.json) stays where it is and is linked, not copied.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from saepipe.errors import SaepipeError

SHOWN_PARENTS = 50
"""Parents listed per SAE on the split-tree index, most absorbed first (the full list is on R.html)."""


def read_recovery(path: str) -> dict:
    """A `saepipe recovery --out` report that names its SAE, or a one-line error."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SaepipeError(
            f"--recovery {path}: not a readable recovery report ({type(e).__name__}); "
            "give the --out JSON of `saepipe recovery`"
        ) from None
    if "absorption" not in report or "sae" not in report:
        raise SaepipeError(
            f"--recovery {path}: no absorption table or SAE named in it; rerun `saepipe recovery --out` "
            "(reports written before the SAE was recorded lack it)"
        )
    return report


def absorption_data(recovery: list[str], reports: list[dict], saes: list[str], out: Path) -> list[dict]:
    """Per recovery report (already read): its SAE's index among the split report's `saes`, the link to its
    absorption page, the mean rate, and the most absorbed parents with the latents that took their place."""
    paths = [Path(p).resolve() for p in saes]
    shown = []
    for path, rep in zip(recovery, reports):
        sae = Path(rep["sae"]).resolve()
        if sae not in paths:
            raise SaepipeError(
                f"--recovery {path} scores {rep['sae']}, which is not one of --saes: give reports of these SAEs"
            )
        parents = sorted(
            (r for r in rep["absorption"] if r["child_tokens"]), key=lambda r: -r["absorption_rate"]
        )
        shown.append(
            {
                "sae": paths.index(sae),
                "page": os.path.relpath(Path(path).with_suffix(".html"), out),
                "rate": rep["absorption_rate"],
                "n_parents": len(rep["absorption"]),
                "parents": [
                    {
                        "parent": r["parent"],
                        "latent": r["parent_latent"],
                        "cos": r["parent_latent_cos"],
                        "rate": r["absorption_rate"],
                        "takers": [
                            {"latent": t["latent"], "share": t["fraction_of_silent"]} for t in r["takers"]
                        ],
                    }
                    for r in parents[:SHOWN_PARENTS]
                ],
            }
        )
    return shown
