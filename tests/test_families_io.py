"""`saepipe families` at its edges: bad input is one line and exit 2, a merged dir round-trips through
load_sae, analyze and evaluate on a real (tiny) model, the family pages work in a real browser, and the
`families` pipeline stage hands its merged dirs to the stages after it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import chromium_driver, chromium_missing, open_page, write_relu_sae
from test_families import FAMILY_P, D, _narrow, _wide, world  # noqa: F401  (world is a fixture)

from saepipe.cli import main


def _with_cfg(src: Path, dst: Path, **changes) -> Path:
    """A copy of SAE dir `src` at `dst` with cfg.json fields changed (dotted keys reach into saepipe.store)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "cfg.json").read_text())
    for key, value in changes.items():
        if key == "fingerprint":
            cfg["saepipe"]["store"][0]["model_fingerprint"] = value
        else:
            cfg[key] = value
    (dst / "cfg.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("threshold-above-1", "--threshold: 1.5 is not a cosine in (0, 1]"),
        ("threshold-0", "--threshold: 0.0 is not a cosine in (0, 1]"),
        ("width-not-below", "--width 10 is not below the wide SAE's 10 latents"),
        ("width-0", "--width: each --width is a positive number of families"),
        ("ladder-not-narrower", "has 10 latents, not fewer than --sae"),
        ("ladder-other-hook", "reads other (d_in 12)"),
        ("ladder-other-model", "trained on activations of another model"),
        ("baseline-other-hook", "baseline SAE"),
        ("direction", "unknown direction 'median'"),
        ("cofire", "--max-cofire"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, world, capsys, case, expected):  # noqa: F811
    _, store, *_ = world
    wide = _wide(tmp_path, store)
    extra = {
        "threshold-above-1": lambda: ["--threshold", "1.5"],
        "threshold-0": lambda: ["--threshold", "0"],
        "width-not-below": lambda: ["--width", "10"],
        "width-0": lambda: ["--width", "0"],
        "ladder-not-narrower": lambda: ["--ladder", str(_with_cfg(wide, tmp_path / "copy"))],
        "ladder-other-hook": lambda: [
            "--ladder",
            str(_with_cfg(_narrow(tmp_path, store), tmp_path / "o", hook_name="other")),
        ],
        "ladder-other-model": lambda: [
            "--ladder",
            str(_with_cfg(_narrow(tmp_path, store), tmp_path / "o", fingerprint="x")),
        ],
        "baseline-other-hook": lambda: [
            "--baselines",
            str(_with_cfg(wide, tmp_path / "o", hook_name="other")),
        ],
        "direction": lambda: ["--direction", "median"],
        "cofire": lambda: ["--max-cofire", "2"],
    }[case]()
    out = tmp_path / "out"
    assert main(["families", "--sae", str(wide), "--store", str(store), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saepipe families: error:") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()  # nothing written before the inputs are known to be good


def test_merged_dir_round_trips_through_load_sae_analyze_evaluate(tmp_path, tiny_store, capsys):
    """A merged relu SAE of the tiny model is an ordinary SAE dir: load_sae, analyze and evaluate take it
    unchanged, and the loss recovered in the trade-off table is exactly what `saepipe evaluate` prints."""
    from saepipe.harvest import open_store
    from saepipe.train import load_sae

    hook = "blocks.1.hook_resid_post"
    store = open_store(str(tiny_store))
    x = store.activations(hook, 0, 8)[:, 1:].reshape(-1, store.d_model).astype(np.float64)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((12, store.d_model))
    # Each base direction split into three: siblings at cosine ~0.8 to each other.
    dec = np.concatenate([base + 0.5 * rng.standard_normal(base.shape) for _ in range(3)])
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)
    enc = dec.T / np.sqrt((x - x.mean(0)).var(0).sum())
    b_enc = -np.quantile((x - x.mean(0)) @ enc, 0.9, axis=0)  # each latent fires on about a tenth of tokens
    wide = write_relu_sae(tmp_path / "wide", tiny_store, hook, enc, b_enc, dec, x.mean(0))
    out = tmp_path / "fam"
    argv = ["families", "--sae", str(wide), "--store", str(tiny_store), "--out", str(out), "--width", "24",
            "--max-cofire", "1", "--eval-contexts", "2", "--eval-batch-size", "2", "--top-contexts", "3"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "families.json").read_text())
    (cut,) = report["cuts"]
    assert cut["n_families"] == 24 and cut["n_merged"] >= 1 and "loss recovered" not in printed
    merged = Path(cut["dir"])
    assert merged.name == "wide-merged-w24" and (out / "index.html").exists()
    sae = load_sae(merged)
    assert (
        sae.d_sae == 24
        and sae.architecture == "relu"
        and sae.cfg["saepipe"]["merged"]["cut"] == {"width": 24}
    )

    assert main(["analyze", "--sae", str(merged), "--out", str(tmp_path / "an"), "--tokens", "256", "--no-dashboard",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "an" / "report.json").read_text())["n_latents"] == 24
    ev = tmp_path / "ev.json"
    assert main(["evaluate", "--sae", str(merged), "--contexts", "2", "--batch-size", "2", "--out", str(ev),
                 "--device", "cpu"]) == 0  # fmt: skip
    row = next(r for r in report["tradeoff"] if r["role"] == "merged")
    assert row["loss_recovered"] == json.loads(ev.read_text())["loss_recovered"]
    assert {r["role"] for r in report["tradeoff"]} == {"wide", "merged, exact code", "merged"}


def test_family_page_in_a_real_browser(tmp_path, world):  # noqa: F811
    """The family page shows the merged latent, the ladder parent and the three members side by side, with
    the contexts the data script holds, and links the parent's split tree."""
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By

    from saepipe.analyze.families_build import build_report
    from saepipe.analyze.families_cmd import FamiliesConfig
    from saepipe.analyze.splitting import SplittingConfig
    from saepipe.analyze.splitting import build_report as splits

    _, store, *_ = world
    wide, narrow = _wide(tmp_path, store), _narrow(tmp_path, store)
    splits(
        SplittingConfig(saes=[str(narrow), str(wide)], store=str(store), out=str(tmp_path / "sp")),
        progress=False,
    )
    out = tmp_path / "fam"
    rep = build_report(
        FamiliesConfig(sae=str(wide), store=str(store), out=str(out), ladder=[str(narrow)], threshold=[0.5],
                       splitting=str(tmp_path / "sp"), top_contexts=3),
        progress=False,
    )  # fmt: skip
    fam = next(f for f in rep["cuts"][0]["families"] if sorted(m["latent"] for m in f["members"]) == FAMILY_P)
    driver = chromium_driver(tmp_path / "profile")
    try:
        wait = open_page(driver, out / "index.html")
        roles = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#tradeoff tr td:nth-child(2)")]
        assert roles == ["wide", "merged, exact code", "merged", "ladder"]
        driver.get((out / "index.html").as_uri() + "#cut/0")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.families tr[data-family]"))
        rows = driver.find_elements(By.CSS_SELECTOR, "table.families tr[data-family]")
        assert rows[0].get_attribute("data-family") == str(fam["family"])  # the largest family first
        driver.get((out / "index.html").as_uri() + f"#cut/0/family/{fam['family']}")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#family .latent")) == 5)
        cols = driver.find_elements(By.CSS_SELECTOR, "#family .latent")
        keys = [c.get_attribute("data-key") for c in cols]
        assert keys == [f"f0/{fam['family']}", "p/0", *(f"w/{i}" for i in FAMILY_P)]
        data = json.loads((out / "data" / "families.js").read_text()[len("SAEPIPE.setFamilies(") : -3])
        for col, key in zip(cols, keys):
            shown = [float(c.get_attribute("data-value")) for c in col.find_elements(By.CSS_SELECTOR, ".ctx")]
            assert shown == data["contexts"][key]["values"] and len(shown) == 3
        link = cols[1].find_element(By.LINK_TEXT, "split tree").get_attribute("href")
        assert link.endswith("sp/index.html#level/0/parent/0")
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


def test_family_pages_inside_the_split_tree_pages(tmp_path, world, capsys):  # noqa: F811
    """`saepipe splitting --families DIR` puts the family pages inside the split-tree site and links both
    ways: the index lists the cuts, a split child links the family it was merged into, and that family's
    page links back to the split trees and to its parent's split tree; a DIR that is no families report is
    one line and exit 2."""
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By

    _, store, *_ = world
    wide, narrow = _wide(tmp_path, store), _narrow(tmp_path, store)
    fam_dir, sp = tmp_path / "fam", tmp_path / "sp"
    common = ["--store", str(store), "--top-contexts", "3"]
    assert main(["families", "--sae", str(wide), "--ladder", str(narrow), "--threshold", "0.5", "--out",
                 str(fam_dir), "--no-loss-recovered", *common]) == 0  # fmt: skip
    capsys.readouterr()
    bad = ["splitting", "--saes", str(narrow), "--saes", str(wide), "--out", str(tmp_path / "bad"), *common]
    assert main([*bad, "--families", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no readable families.json" in err, err
    assert main(["splitting", "--saes", str(narrow), "--saes", str(wide), "--out", str(sp), "--families",
                 str(fam_dir), *common]) == 0  # fmt: skip
    rep = json.loads((fam_dir / "families.json").read_text())
    fam = next(f for f in rep["cuts"][0]["families"] if sorted(m["latent"] for m in f["members"]) == FAMILY_P)
    driver = chromium_driver(tmp_path / "profile")
    try:
        wait = open_page(driver, sp / "index.html")
        cut = driver.find_element(By.CSS_SELECTOR, "#family-cuts a")
        assert cut.text == rep["cuts"][0]["name"] and cut.get_attribute("href").endswith(
            "families/index.html#cut/0"
        )
        driver.get((sp / "index.html").as_uri() + "#level/0/parent/0")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#family .child"))
        kids = {
            int(c.get_attribute("data-latent")): c
            for c in driver.find_elements(By.CSS_SELECTOR, "#family .child")
        }
        assert set(FAMILY_P) <= set(kids)
        for i in FAMILY_P:
            link = kids[i].find_element(By.CSS_SELECTOR, "a.family-link").get_attribute("href")
            assert link.endswith(f"families/index.html#cut/0/family/{fam['family']}")
        kids[FAMILY_P[0]].find_element(By.CSS_SELECTOR, "a.family-link").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#family .latent")) == 5)
        assert driver.find_element(By.ID, "to-splits").get_attribute("href") == (sp / "index.html").as_uri()
        parent = driver.find_element(By.CSS_SELECTOR, "#family .parent")
        back = parent.find_element(By.LINK_TEXT, "split tree").get_attribute("href")
        assert back == (sp / "index.html").as_uri() + "#level/0/parent/0"
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


def test_families_stage_in_a_pipeline(tmp_path, capsys):
    """train -> families -> recovery -> splitting: the merged dir is scored beside the SAEs it came from,
    labelled as merged; the split trees are of the trained SAEs, with the family pages inside and every
    SAE's absorbed parents; a rerun skips every stage."""
    pipelines = {
        "over": {
            "out": str(tmp_path / "runs" / "over"),
            "synth": {"n_features": 48, "d_model": 16, "tokens": 8192, "context_size": 32, "freq_max": 0.3,
                      "freq_min": 0.003, "contexts_per_chunk": 8, "chunks_per_shard": 4, "n_parents": 4,
                      "children_per_parent": 2},
            "train": {"arch": "topk", "width": [32, 96], "k": 2, "tokens": 16384, "batch_size": 512,
                      "buffer_tokens": 2048, "lr": 0.003, "log_every": 16, "checkpoint_every": 16},
            "families": {"width": [48], "max_cofire": 1.0, "top_contexts": 2},
            "recovery": {"n_bins": 4},
            "splitting": {"top_contexts": 2},
        }
    }  # fmt: skip
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump({"pipelines": pipelines}))
    assert main(["run", "over", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    runs = tmp_path / "runs" / "over"
    fam = json.loads((runs / "families" / "families.json").read_text())
    assert fam["sae"].endswith("topk-w96-k2") and [
        r["name"] for r in fam["tradeoff"] if r["role"] == "baseline"
    ] == ["topk-w32-k2"]
    assert (runs / "recovery" / "topk-w96-k2-merged-w48.json").exists()
    table = (runs / "recovery" / "table.md").read_text()
    assert table.strip() in out and "| topk merged from topk-w96-k2 (k=2) | 48 |" in table
    splits = json.loads((runs / "splitting" / "splits.json").read_text())
    assert [Path(x["path"]).name for x in splits["saes"]] == ["topk-w32-k2", "topk-w96-k2"]
    assert (runs / "splitting" / "families" / "data" / "families.js").exists()
    data = json.loads((runs / "splitting" / "data" / "splits.js").read_text()[len("SAEPIPE.setSplits(") : -3])
    assert data["families"]["sae"] == 1 and [a["sae"] for a in data["absorbed"]] == [0, 1]
    assert main(["run", "over", "--config", str(path)]) == 0
    assert capsys.readouterr().out.count("up to date, skipped") == 5
