"""Split trees recover a hand-built split exactly; the frontier's L0 and FVU equal a brute-force reference.

The store holds four kinds of token in d=4: a(e0+e1), a(e0-e1), a e2, a e3. The narrow SAE has latents
along e0 and e2; the wider one splits e0 into (e0+e1) and (e0-e1), keeps e2, and adds e3.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import chromium_driver, chromium_missing, open_page
from safetensors.numpy import save_file

from saepipe.analyze.config import SplittingConfig
from saepipe.analyze.splitting import build_report, cofiring, link_latents
from saepipe.cli import main
from saepipe.harvest.store import StoreWriter

T, C, D = 16, 64, 4  # positions, contexts, d_model
E = np.eye(D, dtype=np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(store path, kind [N] of each token in store order, activations [N, D])."""
    root = tmp_path_factory.mktemp("ladder")
    rng = np.random.default_rng(0)
    kind = rng.integers(0, 5, C * T)  # 0: zero, 1: e0+e1, 2: e0-e1, 3: e2, 4: e3
    a = rng.uniform(0.5, 1.5, C * T).astype(np.float32)
    dirs = np.stack([np.zeros(D), E[0] + E[1], E[0] - E[1], E[2], E[3]]).astype(np.float32)
    x = a[:, None] * dirs[kind]
    settings = {
        "model": {"name": "hand", "fingerprint": "hand", "d_model": D, "n_layers": 0, "dtype": "float32"},
        "tokenizer": {"name": "none", "vocab_size": 5, "bos_token_id": None, "eos_token_id": None},
        "dataset": {"name": "hand", "config": None, "split": "train", "text_column": None},
        "hooks": ["h"],
        "context_size": T,
        "prepend_bos": False,
        "dtype": "float32",
        "compression": "none",
        "contexts_per_chunk": 8,
        "chunks_per_shard": 2,
        "batch_size": 16,
        "seed": 0,
        "n_contexts_target": C,
    }
    w = StoreWriter(str(root / "store"), settings)
    for s in range(0, C, 16):
        w.write_shard(
            s,
            kind[s * T : (s + 16) * T].reshape(16, T).astype(np.int32),
            {"h": x[s * T : (s + 16) * T].reshape(16, T, D)},
            0,
        )
    w.finish()
    return root, kind, x


def _write_sae(path: Path, enc: np.ndarray, b_enc: np.ndarray, dec: np.ndarray) -> Path:
    """A relu SAE dir written by hand to the SAE dir contract."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": enc.T, "b_enc": b_enc, "W_dec": dec, "b_dec": np.zeros(D)}
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        str(path / "sae_weights.safetensors"),
    )
    cfg = {
        "architecture": "relu", "d_in": D, "d_sae": len(dec), "hook_name": "h", "model_name": "hand",
        "dtype": "float32", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "saepipe": {"format_version": 1, "hparams": {}, "input_scale": 1.0},
    }  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _ladder(root: Path, blur: bool) -> tuple[Path, Path, dict]:
    narrow = _write_sae(root / "narrow", np.stack([E[0], E[2]]), np.zeros(2), np.stack([E[0], E[2]]))
    c2 = E[0] - (0.5 if blur else 1.0) * E[1]  # blurred: also fires on e0+e1 tokens
    # Wide latents in shuffled order: 0 = e3 (new), 1 = split half (e0-e1), 2 = e2, 3 = split half (e0+e1)
    enc = np.stack([E[3], c2, E[2], E[0] + E[1]])
    dec = _unit(np.stack([E[3], c2, E[2], E[0] + E[1]]))
    wide = _write_sae(root / ("wide_blur" if blur else "wide"), enc, np.full(4, -0.1), dec)
    return narrow, wide, {"parent_split": 0, "parent_keep": 1, "halves": [1, 3], "keep": 2, "new": 0}


@pytest.mark.parametrize("blur", [False, True])
def test_split_tree_recovers_the_known_split(tmp_path, world, blur):
    root, kind, _ = world
    narrow, wide, ids = _ladder(tmp_path, blur)
    rep = build_report(
        SplittingConfig(saes=[str(wide), str(narrow)], store=str(root / "store"), out=str(tmp_path / "r")),
        progress=False,
    )
    assert [s["d_sae"] for s in rep["saes"]] == [2, 4]  # sorted by width
    (level,) = rep["levels"]
    split = level["parents"][ids["parent_split"]]
    keep = level["parents"][ids["parent_keep"]]
    n1, n2 = int((kind == 1).sum()), int((kind == 2).sum())
    assert sorted(c["latent"] for c in split["children"]) == ids["halves"]
    assert [c["latent"] for c in keep["children"]] == [ids["keep"]] and keep["kind"] == "persists"
    assert level["new_latents"] == [ids["new"]]
    assert split["fires"] == n1 + n2 and split["coverage"] == 1 and split["leak"] == 0
    by = {c["latent"]: c for c in split["children"]}
    assert by[3]["cos"] == pytest.approx(1 / np.sqrt(2)) and by[3]["share"] == pytest.approx(n1 / (n1 + n2))
    if not blur:
        assert split["kind"] == "clean split" and split["overlap"] == 0 and split["sibling_cofire"] == 0
        assert by[1]["share"] == pytest.approx(n2 / (n1 + n2))
        assert level["summary"] == {
            "dropped": 0,
            "persists": 1,
            "clean split": 1,
            "blurred split": 0,
            "new": 1,
        }
        assert level["sibling_histogram"] == [0, n1 + n2 + int((kind == 3).sum())]
    else:  # the (e0 - e1/2) latent also fires on every e0+e1 token: siblings fire together there
        assert split["kind"] == "blurred split"
        assert split["overlap"] == pytest.approx(n1 / (n1 + n2)) and split["sibling_cofire"] == pytest.approx(
            n1 / (n1 + n2)
        )
        assert by[1]["share"] == 1 and by[1]["cos"] == pytest.approx(1 / np.sqrt(1.25))
        assert level["sibling_histogram"] == [0, n2 + int((kind == 3).sum()), n1]


def test_a_second_seed_is_the_baseline_of_every_level(tmp_path, world, capsys):
    """A same-width replicate pairs with the ladder's SAE instead of joining the ladder; a replicate with the
    same latents (rows permuted) agrees 100% and all its latents persist, one with other latents agrees 0%
    and the report says the trees cannot be read."""
    root, _, _ = world
    narrow, wide, _ = _ladder(tmp_path, blur=False)
    same = _write_sae(tmp_path / "narrow_s1", np.stack([E[2], E[0]]), np.zeros(2), np.stack([E[2], E[0]]))
    argv = ["splitting", "--saes", str(narrow), "--saes", str(wide), "--saes", str(same),
            "--store", str(root / "store"), "--out", str(tmp_path / "r"), "--no-pages"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rep = json.loads((tmp_path / "r" / "splits.json").read_text())
    (level,) = rep["levels"]
    assert (level["narrow"], level["wide"]) == (str(narrow), str(wide))
    (pair,) = rep["seed_pairs"]
    assert (pair["a"], pair["b"]) == (str(narrow), str(same))
    assert pair["stability"]["agreement"] == 1.0 and pair["stability"]["weighted"] == 1.0
    assert pair["summary"] == {"dropped": 0, "persists": 2, "clean split": 0, "blurred split": 0, "new": 0}
    assert level["seed_baseline"]["summary"] == pair["summary"]
    assert level["found_again"]["agreement"] == 1.0  # e2 found again; e0 in its halves at |cos| 0.707 > 0.7
    assert rep["verdict"]["readable"] is True
    assert "seed agreement" in printed and "1 persists (50.0%; seeds 100.0%)" in printed

    other = _write_sae(tmp_path / "narrow_s2", np.stack([E[1], E[3]]), np.zeros(2), np.stack([E[1], E[3]]))
    argv = ["splitting", "--saes", str(narrow), "--saes", str(wide), "--saes", str(other),
            "--store", str(root / "store"), "--out", str(tmp_path / "r2"), "--no-pages"]  # fmt: skip
    assert main(argv) == 0
    assert "SPLIT TREES NOT READABLE" in capsys.readouterr().out
    rep = json.loads((tmp_path / "r2" / "splits.json").read_text())
    assert rep["seed_pairs"][0]["stability"]["agreement"] == 0.0 and rep["verdict"]["readable"] is False


def _relu_reference(path: Path, x: np.ndarray) -> tuple[float, float]:
    """L0 and FVU computed directly from the safetensors weights with numpy."""
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(path / "sae_weights.safetensors")).items()}
    z = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    err = ((x - (z @ w["W_dec"] + w["b_dec"])) ** 2).sum()
    return float((z > 0).sum(1).mean()), float(err / ((x - x.mean(0)) ** 2).sum())


def test_frontier_equals_brute_force(tmp_path, world, capsys):
    root, _, x = world
    narrow, wide, _ = _ladder(tmp_path, blur=True)
    out = tmp_path / "report"
    argv = [
        "splitting",
        "--saes",
        str(narrow),
        "--saes",
        str(wide),
        "--store",
        str(root / "store"),
        "--out",
        str(out),
    ]
    assert main([*argv, "--batch-tokens", "100"]) == 0
    assert "clean split" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert [int(r["d_sae"]) for r in rows] == [2, 4]
    for row, sae in zip(rows, (narrow, wide)):
        l0, fvu = _relu_reference(sae, x.astype(np.float64))
        assert float(row["l0"]) == pytest.approx(l0, rel=1e-6) and float(row["fvu"]) == pytest.approx(
            fvu, rel=1e-5, abs=1e-9
        )
        assert row["architecture"] == "relu" and int(row["n_tokens"]) == C * T
    assert 0 < float(rows[0]["fvu"]) < 1  # non-vacuous: the narrow SAE cannot reconstruct e1 and e3
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "splits.json").read_text())["levels"][0]["summary"]["blurred split"] == 1


def test_link_prefers_cosine_times_containment():
    """Two narrow candidates; the child goes to the one whose firing contains it, not merely the closest."""
    lat_a = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], float)  # narrow latent 0 fires on rows 0-1, 1 on 2-3
    lat_b = np.array([[1], [1], [0], [0]], float)
    cos = np.array([[0.6], [0.9]])
    parent = link_latents(cos, cofiring(lat_a, lat_b), min_cos=0.3, min_coactivation=0.5)
    assert parent.tolist() == [0]
    assert link_latents(cos, cofiring(lat_a, lat_b), min_cos=0.7, min_coactivation=0.5).tolist() == [-1]


def _data_script(path: Path, call: str):
    """The object a data script passes to SAEPIPE.<call>(...)."""
    text = path.read_text()
    prefix = f"SAEPIPE.{call}("
    assert text.startswith(prefix) and text.endswith(");\n")
    return json.loads(text[len(prefix) : -3])


def test_sparse_top_n_equals_brute_force():
    """Streamed in batches, with ties and latents that never fire: the top-n of a full sort."""
    from saepipe.analyze.split_pages import SparseTopN

    rng = np.random.default_rng(3)
    N, L, n = 500, 7, 4
    z = np.where(rng.random((N, L)) < 0.3, rng.integers(1, 6, (N, L)).astype(np.float32), 0)  # many ties
    z[:, 5] = 0  # never fires
    z[:, 6] = 0
    z[:7, 6] = [3, 0, 0, 2, 0, 0, 5]  # fewer than n active
    addr = np.stack([np.arange(N) // 10, np.arange(N) % 10], axis=1)
    top = SparseTopN(L, n)
    for b in range(0, N, 64):
        top.update(sp.csr_matrix(z[b : b + 64]), addr[b : b + 64])
    for latent in range(L):
        rows = [r for r in sorted(range(N), key=lambda r: (-z[r, latent], r)) if z[r, latent] > 0][:n]
        vals, got = top.of(latent)
        assert vals.tolist() == z[rows, latent].tolist() and got.tolist() == addr[rows].tolist()
    assert len(top.of(5)[0]) == 0 and len(top.of(6)[0]) == 3


def test_split_pages_show_parents_children_and_their_top_contexts(tmp_path, world):
    root, kind, x = world
    narrow, wide, ids = _ladder(tmp_path, blur=False)
    out = tmp_path / "r"
    cfg = SplittingConfig(
        saes=[str(narrow), str(wide)], store=str(root / "store"), out=str(out), top_contexts=5
    )
    build_report(cfg, progress=False)
    assert (out / "index.html").exists()
    data = _data_script(out / "data" / "splits.js", "setSplits")
    assert _data_script(out / "data" / "vocab.js", "setVocab") == {}  # no tokenizer: the page shows ⟨id⟩
    assert data["has_frontier_png"] and [s["d_sae"] for s in data["saes"]] == [2, 4]
    (level,) = data["levels"]
    assert (level["narrow"], level["wide"]) == (0, 1)
    by = {p["latent"]: p for p in level["parents"]}
    assert sorted(c["latent"] for c in by[ids["parent_split"]]["children"]) == ids["halves"]
    assert by[ids["parent_split"]]["kind"] == "clean split"
    n1, n2 = int((kind == 1).sum()), int((kind == 2).sum())
    shares = {c["latent"]: c["share"] for c in by[0]["children"]}
    assert shares == pytest.approx({3: n1 / (n1 + n2), 1: n2 / (n1 + n2)})
    assert {c["latent"]: round(c["cos"], 6) for c in by[0]["children"]} == {
        1: round(2**-0.5, 6),
        3: round(2**-0.5, 6),
    }

    # Top contexts of the parent and of each child against the contract's relu encoding in numpy.
    from safetensors.numpy import load_file

    for s, sae, latents in ((0, narrow, [0, 1]), (1, wide, [1, 2, 3])):
        w = {k: v.astype(np.float64) for k, v in load_file(str(sae / "sae_weights.safetensors")).items()}
        z = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0).astype(np.float32)
        for latent in latents:
            rows = [r for r in np.argsort(-z[:, latent], kind="stable")[:5] if z[r, latent] > 0]
            shown = data["contexts"][f"{s}/{latent}"]
            np.testing.assert_allclose(shown["values"], z[rows, latent], rtol=1e-6)
            assert shown["contexts"] == [r // T for r in rows] and shown["positions"] == [r % T for r in rows]
            for r, window, peak in zip(rows, shown["windows"], shown["peaks"]):
                c, p = divmod(int(r), T)
                lo = max(0, p - 15)
                assert window == kind[c * T + lo : c * T + min(T, p + 5)].tolist() and peak == p - lo
    assert "0/1" in data["contexts"] and "1/0" not in data["contexts"]  # latent 0 of the wide SAE is new


def test_split_page_in_a_real_browser(tmp_path, world):
    """The parent's page shows the parent and its two children side by side with their contexts."""
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)

    from selenium.webdriver.common.by import By

    root, _, _ = world
    narrow, wide, _ = _ladder(tmp_path, blur=True)
    same = _write_sae(tmp_path / "narrow_s1", np.stack([E[2], E[0]]), np.zeros(2), np.stack([E[2], E[0]]))
    out = tmp_path / "r"
    build_report(
        SplittingConfig(
            saes=[str(narrow), str(wide), str(same)], store=str(root / "store"), out=str(out), top_contexts=3
        ),
        progress=False,
    )
    driver = chromium_driver(tmp_path / "profile")
    try:
        wait = open_page(driver, out / "index.html")
        assert "agree on 100.0% of their latents" in driver.find_element(By.ID, "verdict").text
        assert "seeds 100.0%" in driver.find_element(By.CSS_SELECTOR, ".level-summary").text
        rows = driver.find_elements(By.CSS_SELECTOR, "table.parents tr[data-latent]")
        assert [r.get_attribute("data-latent") for r in rows] == ["0", "1"]  # the split first
        assert "blurred split" in rows[0].text
        driver.get((out / "index.html").as_uri() + "#level/0/parent/0")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#family .latent")) == 3)
        cols = driver.find_elements(By.CSS_SELECTOR, "#family .latent")
        assert [c.get_attribute("data-latent") for c in cols] == ["0", "1", "3"]
        data = _data_script(out / "data" / "splits.js", "setSplits")
        for col, key in zip(cols, ["0/0", "2/1", "2/3"]):  # SAEs by width: narrow, its replicate, wide
            ctxs = col.find_elements(By.CSS_SELECTOR, ".ctx")
            assert [float(c.get_attribute("data-value")) for c in ctxs] == data["contexts"][key]["values"]
            peak = ctxs[0].find_element(By.CSS_SELECTOR, ".tok.peak")
            assert peak.text == f"⟨{data['contexts'][key]['windows'][0][data['contexts'][key]['peaks'][0]]}⟩"
        assert "share of parent's firing" in cols[1].text
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs
    finally:
        driver.quit()


def test_loss_recovered_needs_a_model_store(tmp_path, world, capsys):
    root, _, _ = world
    narrow, wide, _ = _ladder(tmp_path, blur=False)
    argv = ["splitting", "--saes", str(narrow), "--saes", str(wide), "--store", str(root / "store")]
    assert main([*argv, "--out", str(tmp_path / "r"), "--loss-recovered", "--no-pages"]) == 2
    assert "no model to splice the SAEs into" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "r2"), "--no-pages"]) == 0  # default: off for this store
    assert not (tmp_path / "r2" / "index.html").exists()
    assert "loss_recovered" not in json.loads((tmp_path / "r2" / "frontier.json").read_text())[0]


def test_measure_frontier_equals_brute_force(tmp_path, world):
    from saepipe.analyze.frontier import measure_frontier

    root, _, x = world
    narrow, wide, _ = _ladder(tmp_path, blur=True)
    points = measure_frontier([str(wide), str(narrow)], str(root / "store"), batch_tokens=300)
    assert [p.d_sae for p in points] == [4, 2]  # in the order given
    for p, sae in zip(points, (wide, narrow)):
        l0, fvu = _relu_reference(sae, x.astype(np.float64))
        assert p.l0 == pytest.approx(l0, rel=1e-6) and p.fvu == pytest.approx(fvu, rel=1e-5, abs=1e-9)
        assert p.n_tokens == C * T
