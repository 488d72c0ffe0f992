"""Split families are found exactly on hand-built SAEs, merged SAEs reproduce the parents' activations, and
an SAE with no splits merges to itself.

The store holds tokens of nine kinds in d=12, in rounds that give every kind the same magnitude a:
    0 nothing;  1-3 a(e0 + r_k/2), r_k three unit vectors 120 degrees apart in (e1, e2): parent e0 split
    into three exclusive children c_k = (2 e0 + r_k)/sqrt5 (pairwise cosine 0.7);  4-5 a(e3 +- e4/2): parent
    e3 split into q+- = (2 e3 +- e4)/sqrt5 (cosine 0.6);  6 a e5;  7 a e6;  8 a e7 + a/2 (e7 + e8)/sqrt2: two
    latents e7 and (e7 + e8)/sqrt2 (cosine 0.71) that fire together, a composition that must not merge.
The wide relu SAE has one latent per direction above (plus a dead one, e9), in shuffled order; its
encoders give each latent exactly its token's coefficient and strictly negative pre-activations elsewhere.
With equal masses the family direction of c1..c3 is e0 and the family code is a, the parent's magnitude.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_relu_sae
from safetensors.numpy import load_file

from saepipe.analyze.families import Candidates, agglomerate, candidate_pairs, cut
from saepipe.analyze.families_build import build_report
from saepipe.analyze.families_cmd import FamiliesConfig
from saepipe.harvest.store import StoreWriter

T, C, D = 16, 72, 12
E = np.eye(D)
R = [E[1], -0.5 * E[1] + np.sqrt(3) / 2 * E[2], -0.5 * E[1] - np.sqrt(3) / 2 * E[2]]
S5 = np.sqrt(5)
# Wide latents: (decoder row, encoder column, kind it fires on); order shuffled on purpose.
GAMMA = 0.5  # the negative margin of a child's pre-activation on its siblings' tokens
BETA_P = 4 * (S5 / 2 + GAMMA) / 3
BETA_Q = S5 / 2 + GAMMA
WIDE = [
    ("q+", (2 * E[3] + E[4]) / S5, (S5 / 2 - GAMMA) / 2 * E[3] + BETA_Q * E[4]),
    ("e5", E[5], E[5]),
    ("c1", (2 * E[0] + R[0]) / S5, (BETA_P / 4 - GAMMA) * E[0] + BETA_P * R[0]),
    ("e7", E[7], E[7] - E[8]),
    ("c2", (2 * E[0] + R[1]) / S5, (BETA_P / 4 - GAMMA) * E[0] + BETA_P * R[1]),
    ("dead", E[9], E[9]),
    ("e7+e8", (E[7] + E[8]) / np.sqrt(2), np.sqrt(2) * E[8]),
    ("c3", (2 * E[0] + R[2]) / S5, (BETA_P / 4 - GAMMA) * E[0] + BETA_P * R[2]),
    ("e6", E[6], E[6]),
    ("q-", (2 * E[3] - E[4]) / S5, (S5 / 2 - GAMMA) / 2 * E[3] - BETA_Q * E[4]),
]
IDX = {name: i for i, (name, _, _) in enumerate(WIDE)}
FAMILY_P = sorted(IDX[n] for n in ("c1", "c2", "c3"))
FAMILY_Q = sorted(IDX[n] for n in ("q+", "q-"))


def _token(kind: int, a: float) -> np.ndarray:
    if kind == 0:
        return np.zeros(D)
    if kind <= 3:
        return a * (E[0] + R[kind - 1] / 2)
    if kind <= 5:
        return a * (E[3] + (0.5 if kind == 4 else -0.5) * E[4])
    if kind == 6:
        return a * E[5]
    if kind == 7:
        return a * E[6]
    return a * E[7] + a / 2 * (E[7] + E[8]) / np.sqrt(2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, store path, kind [N] and magnitude [N] of each token in store order, activations [N, D])."""
    root = tmp_path_factory.mktemp("families")
    rng = np.random.default_rng(0)
    n = C * T
    rounds = n // 9
    kind = np.tile(np.arange(9), rounds)
    a = np.repeat(rng.uniform(0.5, 1.5, rounds), 9)  # every kind gets the same magnitudes
    perm = rng.permutation(n)
    kind, a = kind[perm], a[perm]
    x = np.stack([_token(k, v) for k, v in zip(kind, a)]).astype(np.float32)
    settings = {
        "model": {"name": "hand", "fingerprint": "hand", "d_model": D, "n_layers": 0, "dtype": "float32"},
        "tokenizer": {"name": "none", "vocab_size": 9, "bos_token_id": None, "eos_token_id": None},
        "dataset": {"name": "hand", "config": None, "split": "train", "text_column": None},
        "hooks": ["h"], "context_size": T, "prepend_bos": False, "dtype": "float32", "compression": "none",
        "contexts_per_chunk": 8, "chunks_per_shard": 2, "batch_size": 16, "seed": 0, "n_contexts_target": C,
    }  # fmt: skip
    w = StoreWriter(str(root / "store"), settings)
    for s in range(0, C, 16):
        rows = slice(s * T, (s + 16) * T)
        w.write_shard(s, kind[rows].reshape(-1, T).astype(np.int32), {"h": x[rows].reshape(-1, T, D)}, 0)
    w.finish()
    return root, root / "store", kind, a, x


def _wide(root: Path, store: Path, name: str = "wide") -> Path:
    dec = np.stack([d for _, d, _ in WIDE])
    enc = np.stack([e for _, _, e in WIDE]).T
    m = len(WIDE)
    return write_relu_sae(root / name, store, "h", enc, np.zeros(m), dec, np.zeros(D))


def _narrow(root: Path, store: Path) -> Path:
    dirs = np.stack([E[0], E[3], E[5]])
    return write_relu_sae(root / "narrow", store, "h", dirs.T, np.zeros(3), dirs, np.zeros(D))


def _families(report: dict, c: int) -> list[list[int]]:
    return sorted(
        sorted(m["latent"] for m in f["members"]) for f in report["cuts"][c]["families"] if f["size"] > 1
    )


def _relu_codes(sae: Path, x: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in load_file(str(sae / "sae_weights.safetensors")).items()}
    return np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)


def test_wide_sae_codes_are_what_the_world_says(tmp_path, world):
    """Guard for the tests below: each latent fires exactly on its kind with the designed value."""
    _, store, kind, a, x = world
    z = _relu_codes(_wide(tmp_path, store), x.astype(np.float64))
    on = {"c1": 1, "c2": 2, "c3": 3, "q+": 4, "q-": 5, "e5": 6, "e6": 7, "e7": 8, "e7+e8": 8}
    for name, k in on.items():
        i = IDX[name]
        assert set(np.flatnonzero(z[:, i] > 1e-9)) == set(np.flatnonzero(kind == k)), name
    np.testing.assert_allclose(z[kind == 1, IDX["c1"]], a[kind == 1] * S5 / 2, rtol=1e-6)
    np.testing.assert_allclose(z[kind == 8, IDX["e7+e8"]], a[kind == 8] / 2, rtol=1e-6)
    assert (z[:, IDX["dead"]] == 0).all()


@pytest.mark.parametrize("ladder", [False, True])
def test_families_found_exactly_and_merged_code_is_the_parent(tmp_path, world, ladder):
    _, store, kind, a, x = world
    wide = _wide(tmp_path, store)
    narrow = _narrow(tmp_path, store)
    cfg = FamiliesConfig(
        sae=str(wide), store=str(store), out=str(tmp_path / "fam"), threshold=[0.5, 0.65], width=[7, 6, 3],
        ladder=[str(narrow)] if ladder else [], batch_tokens=100,
    )  # fmt: skip
    rep = build_report(cfg, progress=False)
    names = [c["name"] for c in rep["cuts"]]
    assert names == [
        "wide-merged-t0.65",
        "wide-merged-t0.5",
        "wide-merged-w7",
        "wide-merged-w6",
        "wide-merged-w3",
    ]
    # 0.65 and width 7: only the three-way split (cosine 0.7, then 0.76); 0.5 and width 6: both splits.
    # The dead latent is left out: nine live latents.
    assert _families(rep, 0) == [FAMILY_P] and _families(rep, 2) == [FAMILY_P]
    assert _families(rep, 1) == sorted([FAMILY_P, FAMILY_Q]) == _families(rep, 3) == _families(rep, 4)
    # Width 3 cannot be reached: nothing else is similar, and the composition fires together.
    assert [c["reached"] for c in rep["cuts"]] == [True, True, True, True, False]
    (band, *_) = rep["pair_cofire"]  # five candidate pairs: four exclusive siblings, one composition
    assert band["cos_min"] == 0.3 and band["pairs"] == 5 and band["share_exclusive"] == pytest.approx(0.8)
    cut = rep["cuts"][1]
    assert cut["n_families"] == len(WIDE) - 4 and rep["dead_latents"] == 1
    fam = {tuple(sorted(m["latent"] for m in f["members"])): f for f in cut["families"]}
    p = fam[tuple(FAMILY_P)]
    n_p = int(np.isin(kind, [1, 2, 3]).sum())
    assert p["fires"] == n_p and p["sibling_cofire"] == 0
    assert p["energy_kept"] == pytest.approx(0.8)  # |a e0|^2 / |a (e0 + r/2)|^2
    assert all(
        m["weight"] == pytest.approx(2 / S5) and m["cos"] == pytest.approx(2 / S5) for m in p["members"]
    )
    if ladder:
        assert p["parent"] == {"latent": 0, "cos": pytest.approx(1.0)} and p[
            "parent_mass_covered"
        ] == pytest.approx(1)
        assert fam[tuple(FAMILY_Q)]["parent"]["latent"] == 1
    else:
        assert "parent" not in p

    # The merged dir: family P's latent has decoder e0 and reproduces the parent's activation a.
    from saepipe.analyze.merge import load_exact
    from saepipe.train import load_sae

    merged_dir = Path(cut["dir"])
    merged = load_sae(merged_dir)
    assert merged.architecture == "relu" and merged.d_sae == len(WIDE) - 4
    f_p = p["family"]
    np.testing.assert_allclose(merged.W_dec[f_p].detach().numpy(), E[0], atol=1e-6)
    import torch

    xt = torch.from_numpy(x)
    parent_act = np.where(np.isin(kind, [1, 2, 3]), a, 0)
    exact = load_exact(merged_dir).encode(xt).detach().numpy()
    np.testing.assert_allclose(exact[:, f_p], parent_act, atol=1e-5)
    np.testing.assert_allclose(merged.encode(xt).detach().numpy()[:, f_p], parent_act, atol=1e-4)
    narrow_code = _relu_codes(narrow, x.astype(np.float64))
    np.testing.assert_allclose(exact[:, f_p], narrow_code[:, 0], atol=1e-5)  # the ladder parent's own code
    # Latents left alone keep their activations and rows exactly (here: the composition e7, e7+e8).
    wide_code = _relu_codes(wide, x.astype(np.float64))
    fam_of = load_file(str(merged_dir / "families.safetensors"))["family"]
    assert fam_of[IDX["dead"]] == -1 and sorted(set(fam_of.tolist())) == list(range(-1, len(WIDE) - 4))
    for name in ("e7", "e7+e8", "e5"):
        i = IDX[name]
        np.testing.assert_allclose(
            merged.encode(xt).detach().numpy()[:, fam_of[i]], wide_code[:, i], atol=1e-6
        )

    # The trade-off's FVU and L0, exact and as written, against numpy on the weights.
    w = load_file(str(merged_dir / "families.safetensors"))["weight"].astype(np.float64)
    W = np.zeros((len(WIDE), merged.d_sae))
    W[fam_of >= 0, fam_of[fam_of >= 0]] = w[fam_of >= 0]
    m_w = {k: v.astype(np.float64) for k, v in load_file(str(merged_dir / "sae_weights.safetensors")).items()}
    x64 = x.astype(np.float64)
    total = ((x64 - x64.mean(0)) ** 2).sum()
    rows = {r["role"]: r for r in rep["tradeoff"] if r["name"].startswith(merged_dir.name)}
    a_exact = wide_code @ W
    fvu_exact = ((x64 - a_exact @ m_w["W_dec"] - m_w["b_dec"]) ** 2).sum() / total
    z_fit = _relu_codes(merged_dir, x64)
    fvu_fit = ((x64 - z_fit @ m_w["W_dec"] - m_w["b_dec"]) ** 2).sum() / total
    assert rows["merged, exact code"]["fvu"] == pytest.approx(fvu_exact, rel=1e-5, abs=1e-9)
    assert rows["merged"]["fvu"] == pytest.approx(fvu_fit, rel=1e-4, abs=1e-7)
    assert rows["merged, exact code"]["l0"] == pytest.approx((a_exact > 0).sum(1).mean())
    assert 0.01 < fvu_exact < 0.2  # non-vacuous: merging loses the split directions' e1, e2, e4 parts


def test_agglomerate_refuses_co_firing_pairs_and_cut_replays_prefixes():
    dec = np.array([[1, 0, 0], [0.9, 0.436, 0], [0.9, -0.436, 0], [0, 0, 1.0]])
    pairs = candidate_pairs(dec, 0.3)
    assert pairs.i.tolist() == [0, 0, 1] and pairs.j.tolist() == [1, 2, 2]
    fires = np.array([100, 100, 100, 100])
    co = np.array([0, 50, 0])  # latents 0 and 2 fire together half the time
    merges = agglomerate(dec, np.ones(4), fires, pairs, co, max_cofire=0.1, min_score=0.2)
    assert [(m.a, m.b) for m in merges] == [(0, 1)]  # (0, 2) co-fire; {0, 1} with 2: 50/200 co-firing
    assert cut(merges, 4).tolist() == [0, 0, 1, 2] and cut(merges, 4, threshold=0.9).tolist() == [0, 1, 2, 3]
    loose = agglomerate(dec, np.ones(4), fires, pairs, co, max_cofire=1.0, min_score=0.2)
    assert len(loose) == 2 and cut(loose, 4).tolist() == [0, 0, 0, 1]
    assert cut(loose, 4, width=3).tolist() == [0, 0, 1, 2]
    empty = Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    assert agglomerate(dec, np.ones(4), fires, empty, np.zeros(0), 0.1, 0.2) == []


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_an_sae_with_no_splits_merges_to_itself(tmp_path, world, arch):
    import torch

    from saepipe.train.sae_dir import save_sae
    from saepipe.train.saes import build_sae

    store = world[1]
    torch.manual_seed(0)
    sae = build_sae(arch, D, 9, k=2 if arch == "topk" else None)
    with torch.no_grad():
        q = torch.from_numpy(E[np.random.default_rng(1).permutation(9)]).float()  # e0..e8: every one is used
        sae.W_dec.copy_(q)  # orthogonal rows: no pair is a candidate
        sae.W_enc.copy_(q.T * 3 + 0.05 * torch.randn(D, 9))
        sae.b_enc.copy_(torch.randn(9) * 0.05)
        if arch == "jumprelu":
            sae.set_tensor("threshold", torch.full((9,), 0.2))
    from saepipe.harvest import open_store

    rec = {
        "path": str(store),
        "model_fingerprint": open_store(str(store)).settings["model"]["fingerprint"],
        "hook": "h",
    }
    path = save_sae(sae, tmp_path / arch, "h", "hand", saepipe={"store": [rec]})
    rep = build_report(
        FamiliesConfig(sae=str(path), store=str(store), out=str(tmp_path / "f"), threshold=[0.3]),
        progress=False,
    )
    assert rep["candidate_pairs"] == 0 and rep["cuts"][0]["n_merged"] == 0 and rep["dead_latents"] == 0
    merged = Path(rep["cuts"][0]["dir"])
    a_t, b_t = (
        load_file(str(path / "sae_weights.safetensors")),
        load_file(str(merged / "sae_weights.safetensors")),
    )
    assert set(a_t) == set(b_t)
    for name in a_t:
        np.testing.assert_allclose(b_t[name], a_t[name], rtol=1e-6, err_msg=name)
        if name != "threshold":  # jumprelu keeps log(threshold); the others are copied bit for bit
            assert (b_t[name] == a_t[name]).all(), name
    cfg_a, cfg_b = (json.loads((p / "cfg.json").read_text()) for p in (path, merged))
    assert cfg_b["saepipe"]["architecture"] == arch and cfg_b["architecture"] == cfg_a["architecture"]
    assert cfg_b.get("k") == cfg_a.get("k") and cfg_b["saepipe"].get("k") == cfg_a["saepipe"].get("k")
    rows = {r["role"]: r for r in rep["tradeoff"]}
    assert (
        rows["merged"]["fvu"] == pytest.approx(rows["wide"]["fvu"], rel=1e-6)
        and rows["merged"]["firing_f1"] == 1.0
    )


def test_refit_direction_is_the_top_principal_direction_of_the_family():
    """`refit` from the streamed Gram equals the top eigenvector of the family's reconstructions R^T R."""
    from saepipe.analyze.families import merged_decoder

    rng = np.random.default_rng(0)
    dec = rng.standard_normal((5, 6))
    family = np.array([0, 0, 0, 1, 2])
    z = np.abs(rng.standard_normal((200, 3))) * (rng.random((200, 3)) < 0.5)  # codes of latents 0..2
    gram = z.T @ z
    gi, gj = np.array([0, 0, 1]), np.array([1, 2, 2])
    sq = np.r_[np.diag(gram), 1.0, 1.0]
    md = merged_decoder(dec, np.r_[z.sum(0), 1, 1], family, "refit", (gi, gj, gram[gi, gj]), sq)
    r = z @ dec[:3]  # the family's part of the reconstruction, per token
    u = np.linalg.eigh(r.T @ r)[1][:, -1]
    assert abs(md.decoder[0] @ u) == pytest.approx(1, abs=1e-9)
    np.testing.assert_allclose(md.weight[:3], dec[:3] @ md.decoder[0])
    assert (md.decoder[1:] == dec[3:]).all() and (md.weight[3:] == 1).all() and md.sizes.tolist() == [3, 1, 1]
    mean = merged_decoder(dec, np.r_[z.sum(0), 1, 1], family, "mean")
    s = (dec[:3] / np.linalg.norm(dec[:3], axis=1, keepdims=True) * z.sum(0)[:, None]).sum(0)
    np.testing.assert_allclose(mean.decoder[0], s / np.linalg.norm(s))
