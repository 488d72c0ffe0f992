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
from safetensors.numpy import save_file

from saepipe.analyze.splitting import SplittingConfig, build_report, cofiring, link_latents
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
