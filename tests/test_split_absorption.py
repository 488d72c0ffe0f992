"""`saepipe splitting --recovery R.json ...` on a synthetic set (issue 12): the split-tree pages list each SAE's
absorbed parent features and link the latents that fired in their place to their own split trees, in a real
browser; a report of another SAE, or one that does not name its SAE, is one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import chromium_driver, chromium_missing, open_page
from test_recovery import _relu_sae

from saepipe.cli import main
from saepipe.harvest.synthetic import SynthConfig, generate, open_truth


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.fixture
def absorbed_world(tmp_path):
    """A set with one parent P (children C1, C2 always fire with it) and two hand-built SAEs on it. Narrow:
    latent 0 is P + C1 (it fires only where both are), latent 1 is P alone but never fires (its bias is
    too low), then one latent per other feature: P is absorbed, and latent 0 fires in its place. Wide: every
    true direction, plus two dead latents: latent 0 splits into P and C1."""
    cfg = SynthConfig(
        out=str(tmp_path / "set"), n_features=8, d_model=16, tokens=16384, context_size=32, freq_max=0.4,
        freq_min=0.05, magnitude="constant", n_parents=1, children_per_parent=2, seed=3,
    )  # fmt: skip
    generate(cfg, progress=False)
    truth = open_truth(cfg.out)
    d = truth.directions.astype(np.float64)
    c1, _ = np.flatnonzero(truth.parent >= 0)
    p = int(truth.parent[c1])
    others = [f for f in range(len(d)) if f not in (p, c1)]
    narrow_dec = np.stack([_unit(d[p] + d[c1]), d[p], *d[others]])
    narrow_b = np.array([-1.0, -100.0, *[-0.5] * len(others)])
    rng = np.random.default_rng(0)
    wide_dec = np.concatenate([d, np.stack([_unit(rng.normal(size=16)) for _ in range(2)])])
    wide_b = np.array([-0.5] * len(d) + [-100.0, -100.0])
    narrow = _relu_sae(tmp_path / "narrow", narrow_dec, narrow_b, truth.fingerprint)
    wide = _relu_sae(tmp_path / "wide", wide_dec, wide_b, truth.fingerprint)
    reports = []
    for sae in (narrow, wide):
        rep = tmp_path / f"{sae.name}.json"
        assert main(["recovery", "--sae", str(sae), "--truth", cfg.out, "--out", str(rep)]) == 0
        reports.append(rep)
    return cfg.out, narrow, wide, reports, p


def test_absorbed_parents_link_their_takers_split_trees(tmp_path, absorbed_world, capsys):
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By

    truth, narrow, wide, reports, p = absorbed_world
    rec = json.loads(reports[0].read_text())
    row = next(r for r in rec["absorption"] if r["parent"] == p)
    assert row["parent_latent"] == 1 and row["absorption_rate"] > 0.9  # the world is as built
    assert 0 in [t["latent"] for t in row["takers"]]
    out = tmp_path / "sp"
    argv = [
        "splitting",
        "--saes",
        str(narrow),
        "--saes",
        str(wide),
        "--store",
        f"{truth}/store",
        "--out",
        str(out),
    ]
    assert main([*argv, "--recovery", str(reports[0]), "--recovery", str(reports[1])]) == 0
    splits = json.loads((out / "splits.json").read_text())
    kids = {q["latent"]: [c["latent"] for c in q["children"]] for q in splits["levels"][0]["parents"]}
    assert kids.get(0), "latent 0 of the narrow SAE has children one width up"
    driver = chromium_driver(tmp_path / "profile")
    try:
        wait = open_page(driver, out / "index.html")
        tables = driver.find_elements(By.CSS_SELECTOR, "table.absorbed")
        assert [t.get_attribute("data-sae") for t in tables] == ["0", "1"]
        shown = [
            int(r.get_attribute("data-parent"))
            for r in tables[0].find_elements(By.CSS_SELECTOR, "tr[data-parent]")
        ]
        ranked = sorted(
            (r for r in rec["absorption"] if r["child_tokens"]), key=lambda r: -r["absorption_rate"]
        )
        assert shown == [r["parent"] for r in ranked]
        cells = (
            tables[0].find_element(By.CSS_SELECTOR, f"tr[data-parent='{p}']").find_elements(By.TAG_NAME, "td")
        )
        own = cells[1].find_element(By.TAG_NAME, "a").get_attribute("href")
        assert own.endswith(f"narrow.html#latent-{row['parent_latent']}")  # latent 1 has no split tree
        takers = {a.text: a.get_attribute("href") for a in cells[4].find_elements(By.TAG_NAME, "a")}
        assert set(takers) == {str(t["latent"]) for t in row["takers"]}
        for latent, href in takers.items():
            tree = int(latent) in kids and kids[int(latent)]
            assert href.endswith(f"#level/0/parent/{latent}" if tree else f"narrow.html#latent-{latent}")
        cells[4].find_element(By.LINK_TEXT, "0").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#family .parent"))
        back = driver.find_element(By.CSS_SELECTOR, "#family .parent a.absorbed-link")
        assert back.text == f"feature {p}" and back.get_attribute("href").endswith(f"narrow.html#parent-{p}")
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


def test_recovery_report_of_another_sae_or_without_one_is_refused(tmp_path, absorbed_world, capsys):
    truth, narrow, _, reports, _ = absorbed_world
    old = tmp_path / "old.json"
    report = json.loads(reports[0].read_text())
    del report["sae"]
    old.write_text(json.dumps(report))
    capsys.readouterr()
    for bad, expected in (
        (reports[1], "which is not one of --saes"),
        (old, "no absorption table or SAE named"),
    ):
        out = tmp_path / "out"
        argv = ["splitting", "--saes", str(narrow), "--store", f"{truth}/store", "--out", str(out)]
        assert main([*argv, "--recovery", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
        assert not out.exists()
