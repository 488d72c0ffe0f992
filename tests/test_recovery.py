"""Recovery metrics give the known answers on hand-built dictionaries and equal brute-force references.

A perfect dictionary scores 1 everywhere; one missing feature j loses exactly j; a feature split over two
latents has spread 2; a parent whose latent is silent where its children are is absorbed (rate 1 when its latent is missing).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import chromium_driver, chromium_missing
from safetensors.numpy import save_file

from saepipe.analyze.absorption_page import write_absorption_page
from saepipe.analyze.recovery import (
    RecoveryAccumulator,
    Thresholds,
    firing_counts,
    firing_scores,
    frequency_bins,
    match_directions,
    recovery_metrics,
)
from saepipe.cli import main
from saepipe.harvest import open_store
from saepipe.harvest.config import SynthConfig
from saepipe.harvest.synthetic import generate, open_truth

N, n, d = 3000, 12, 8


def _unit(rng, k, dim):
    v = rng.standard_normal((k, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def world():
    """Random directions, frequencies 0.2..0.02 and codes with positive values."""
    rng = np.random.default_rng(0)
    directions = _unit(rng, n, d)
    freq = np.geomspace(0.2, 0.02, n)
    present = rng.random((N, n)) < freq
    codes = sp.csr_matrix(np.where(present, rng.uniform(0.5, 1.5, (N, n)), 0.0))
    return directions, freq, codes, present


def test_perfect_dictionary_scores_one(world):
    directions, freq, codes, _ = world
    perm = np.random.default_rng(1).permutation(n)  # latent i is feature perm[i]
    rep = recovery_metrics(
        directions, freq, np.full(n, -1), directions[perm], codes, codes[:, perm].toarray()
    )
    assert rep.mmcs == pytest.approx(1) and rep.matched_score == pytest.approx(1)
    assert rep.fraction_recovered == 1 and rep.split_features == 0 and rep.dead_latents == 0
    assert rep.mean_feature_best_f1 == pytest.approx(1) and rep.mean_latent_f1 == pytest.approx(1)
    assert rep.per_feature["spread"] == [1] * n
    assert rep.per_latent["feature"] == perm.tolist()
    assert rep.per_feature["matched_latent"] == np.argsort(perm).tolist()
    assert all(b["fraction_recovered"] == 1 for b in rep.by_frequency)


@pytest.mark.parametrize("j", [0, 5, n - 1])
def test_missing_feature_loses_exactly_j(world, j):
    directions, freq, codes, _ = world
    keep = [i for i in range(n) if i != j]
    rep = recovery_metrics(
        directions, freq, np.full(n, -1), directions[keep], codes, codes[:, keep].toarray()
    )
    f = rep.per_feature
    others = np.array(keep)
    assert np.allclose(np.array(f["best_cos"])[others], 1) and f["best_cos"][j] < 0.99
    assert f["matched_latent"][j] == -1 and f["matched_cos"][j] == 0
    assert np.allclose(np.array(f["matched_cos"])[others], 1)
    assert rep.matched_score == pytest.approx((n - 1) / n)
    assert np.allclose(np.array(f["best_f1"])[others], 1) and f["best_f1"][j] < 0.5
    assert f["spread"][j] == 0 and all(f["spread"][i] == 1 for i in keep)
    # Exactly one frequency bin loses exactly one feature.
    lost = [b["n_features"] * (1 - b["fraction_recovered"]) for b in rep.by_frequency]
    assert sorted(np.round(lost, 9)) == [0] * (len(lost) - 1) + [1]
    bins = frequency_bins(freq, 10)
    hit = next(k for k, b in enumerate(bins) if j in b)
    assert lost[hit] == pytest.approx(1)


def test_split_feature_spreads_over_two_latents(world):
    directions, freq, codes, present = world
    j = 3
    tokens = np.flatnonzero(present[:, j])
    half_a = tokens[: len(tokens) // 2]
    acts = codes.toarray()
    a, b = acts[:, j].copy(), acts[:, j].copy()
    a[tokens[len(tokens) // 2 :]] = 0  # latent a fires on the first half of j's tokens, b on the rest
    b[half_a] = 0
    decoder = np.vstack([directions, directions[j]])
    latents = np.column_stack([acts[:, :j], a, acts[:, j + 1 :], b])
    rep = recovery_metrics(directions, freq, np.full(n, -1), decoder, codes, latents)
    assert rep.per_feature["spread"][j] == 2 and rep.split_features == 1
    assert sum(rep.per_feature["spread"]) == n + 1
    assert rep.mmcs == pytest.approx(1)  # directions alone cannot see a split
    assert rep.per_feature["best_f1"][j] == pytest.approx(
        2 * len(tokens) / 2 / (len(tokens) / 2 + len(tokens)), rel=0.01
    )
    assert rep.per_latent["precision"][j] == 1 and rep.per_latent["precision"][n] == 1


def test_firing_scores_equal_brute_force():
    rng = np.random.default_rng(2)
    m, k, T = 7, 5, 400
    fires = rng.random((T, m)) < 0.3
    present = rng.random((T, k)) < 0.25
    codes = sp.csr_matrix(present * 1.0)
    latents = fires * rng.uniform(0.1, 2, (T, m))
    counts = firing_counts(codes, latents)
    fs = firing_scores(counts)
    co = fires.T.astype(int) @ present.astype(int)
    np.testing.assert_array_equal(counts.co.toarray(), co)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = co / fires.sum(0)[:, None]
        rec = co / present.sum(0)[None, :]
        f1 = np.nan_to_num(2 * prec * rec / (prec + rec))
    for i in range(m):
        jbest = int(np.argmax(f1[i]))
        assert fs.latent_feature[i] == jbest
        assert fs.latent_f1[i] == pytest.approx(f1[i, jbest])
        assert fs.latent_precision[i] == pytest.approx(prec[i, jbest])
        assert fs.latent_recall[i] == pytest.approx(rec[i, jbest])
    np.testing.assert_allclose(fs.feature_best_f1, f1.max(0))
    assert not np.allclose(fs.feature_best_f1, 1)  # non-vacuous: random latents are imperfect


def test_streaming_equals_one_batch(world):
    """Summing counts over batches (with sparse latents) gives exactly the one-batch report."""
    directions, freq, codes, _ = world
    rng = np.random.default_rng(3)
    decoder = directions[:10] + 0.3 * _unit(rng, 10, d)
    latents = np.maximum(codes.toarray()[:, :10] + rng.normal(0, 0.3, (N, 10)), 0)
    parent = np.full(n, -1)
    parent[[4, 5]] = 1
    one = recovery_metrics(directions, freq, parent, decoder, codes, latents)
    acc = RecoveryAccumulator(directions, parent, decoder)
    for s in (slice(0, 1000), slice(1000, 1700), slice(1700, N)):
        acc.update(codes[s], sp.csr_matrix(latents[s]))
    assert acc.report(freq) == one
    assert 0 < one.mean_feature_best_f1 < 1


def test_hungarian_equals_brute_force():
    rng = np.random.default_rng(4)
    cos = rng.uniform(-1, 1, (5, 6))
    best = max(sum(cos[r, p[r]] for r in range(5)) for p in itertools.permutations(range(6), 5))
    assert match_directions(cos).matched_score == pytest.approx(best / 5)


def _hierarchy_world(rng):
    """Feature 0 a parent with children 1 and 2 (exclusive, always with it), 3..5 independent."""
    k = 6
    directions = _unit(rng, k, d)
    parent = np.array([-1, 0, 0, -1, -1, -1])
    T = 2000
    pres = np.zeros((T, k), bool)
    pres[:, 0] = rng.random(T) < 0.3
    u = rng.random(T)
    pres[:, 1] = pres[:, 0] & (u < 0.4)
    pres[:, 2] = pres[:, 0] & (u >= 0.4) & (u < 0.7)
    pres[:, 3:] = rng.random((T, 3)) < 0.1
    return directions, parent, pres


def test_absorption_of_parent_by_child():
    """Child 1's latent points along parent + child 1 and fires in the parent latent's place."""
    directions, parent, pres = _hierarchy_world(np.random.default_rng(5))
    codes = sp.csr_matrix(pres * 1.0)
    latents = pres * 1.0
    latents[pres[:, 1], 0] = 0  # the parent latent is silent where child 1 is present
    decoder = directions.copy()
    decoder[1] = directions[0] + directions[1]
    freq = pres.mean(0)
    rep = recovery_metrics(directions, freq, parent, decoder, codes, latents, Thresholds(n_bins=3))
    (row,) = rep.absorption
    with_child = pres[:, 1] | pres[:, 2]
    assert row["parent"] == 0 and row["parent_latent"] == 0 and row["child_tokens"] == with_child.sum()
    assert row["silent_tokens"] == pres[:, 1].sum()
    assert rep.absorption_rate == pytest.approx(pres[:, 1].sum() / with_child.sum())
    taker = row["takers"][0]  # latent 1 fires on every silent token and carries the parent's direction
    assert taker["latent"] == 1 and taker["fraction_of_silent"] == 1
    assert taker["cos_to_parent"] == pytest.approx(decoder[1] @ directions[0] / np.linalg.norm(decoder[1]))
    clean = recovery_metrics(directions, freq, parent, directions, codes, pres * 1.0)
    assert clean.absorption_rate == 0 and clean.absorption[0]["takers"] == []


def test_perfect_sae_has_mcc_f1_one_and_no_absorption():
    directions, parent, pres = _hierarchy_world(np.random.default_rng(6))
    perm = np.random.default_rng(7).permutation(len(parent))
    codes = sp.csr_matrix(pres * 1.0)
    rep = recovery_metrics(directions, pres.mean(0), parent, directions[perm], codes, pres[:, perm] * 1.0)
    assert rep.mcc == pytest.approx(1) and rep.f1 == pytest.approx(1) and rep.absorption_rate == 0


def test_sae_missing_a_parent_scores_it_absorbed():
    """Without a latent for the parent, its best latent (another feature's) is silent wherever that other
    feature is absent: the parent scores as absorbed, and the children's latents are the takers."""
    directions, parent, pres = _hierarchy_world(np.random.default_rng(8))
    keep = [1, 2, 3, 4, 5]
    codes = sp.csr_matrix(pres * 1.0)
    rep = recovery_metrics(directions, pres.mean(0), parent, directions[keep], codes, pres[:, keep] * 1.0)
    (row,) = rep.absorption
    stand_in = keep[int(np.argmax(directions[keep] @ directions[0]))]
    assert row["parent_latent"] == keep.index(stand_in) and stand_in not in (1, 2)  # not a child's latent
    with_child = pres[:, 1] | pres[:, 2]
    assert (
        rep.absorption_rate == pytest.approx((~pres[with_child, stand_in]).mean())
        and rep.absorption_rate > 0.8
    )
    assert {t["latent"] for t in row["takers"]} >= {0, 1}


def test_mcc_equals_brute_force():
    """MCC: mean |cos| over the best one-to-one matching of the smaller side (4 features, 6 latents)."""
    cos = np.random.default_rng(9).uniform(-1, 1, (4, 6))
    best = max(sum(abs(cos[r, p[r]]) for r in range(4)) for p in itertools.permutations(range(6), 4))
    assert match_directions(cos).mcc == pytest.approx(best / 4)
    wide = cos.T  # 6 features, 4 latents: still 4 pairs
    assert match_directions(wide).mcc == pytest.approx(best / 4)


def test_frequency_bins_most_frequent_first():
    freq = np.array([0.1, 0.5, 0.01, 0.3, 0.2])
    assert [b.tolist() for b in frequency_bins(freq, 2)] == [[1, 3, 4], [0, 2]]
    assert len(frequency_bins(freq, 10)) == 5


def _relu_sae(path, W_dec, b_enc, fingerprint):
    """A relu SAE dir written by hand (SAE dir contract): encoder = decoder transpose."""
    path.mkdir()
    d_sae, dim = W_dec.shape
    t = {"W_enc": W_dec.T, "b_enc": b_enc, "W_dec": W_dec, "b_dec": np.zeros(dim)}
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()},
        str(path / "sae_weights.safetensors"),
    )
    cfg = {
        "architecture": "relu", "d_in": dim, "d_sae": d_sae, "hook_name": "synthetic", "model_name": "synthetic",
        "dtype": "float32", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "saepipe": {"format_version": 1, "hparams": {}, "store": {"model_fingerprint": fingerprint}},
    }  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def test_command_equals_in_memory_reference(tmp_path, capsys):
    """`saepipe recovery` streaming the store through load_sae equals the metrics over all arrays at once."""
    cfg = SynthConfig(
        out=str(tmp_path / "set"), n_features=24, d_model=12, tokens=4096, context_size=32,
        contexts_per_chunk=4, chunks_per_shard=2, freq_max=0.2, freq_min=2e-4, n_parents=2,
    )  # fmt: skip
    generate(cfg, progress=False)
    truth = open_truth(cfg.out)
    W_dec = truth.directions[:20].astype(np.float64)
    sae = _relu_sae(tmp_path / "sae", W_dec, np.full(20, -0.3), truth.fingerprint)
    out = tmp_path / "rec.json"
    argv = ["recovery", "--sae", str(sae), "--truth", cfg.out, "--out", str(out), "--batch-tokens", "300"]
    assert main(argv) == 0
    assert "MMCS" in capsys.readouterr().out
    got = json.loads(out.read_text())
    x = open_store(truth.store_path).activations("synthetic").reshape(-1, 12).astype(np.float64)
    z = np.maximum(x @ W_dec.T - 0.3, 0)  # relu encode, computed here from the weights
    codes = truth.codes(0, 128)
    ref = recovery_metrics(truth.directions, truth.frequencies, truth.parent, W_dec, codes, z)
    ref_json = json.loads(json.dumps(asdict(ref)))
    for key, value in ref_json.items():
        _assert_close(got[key], value)
    assert got["per_latent"]["fires"] == ref_json["per_latent"]["fires"]
    assert len(got["absorption"]) == 2 and 0 < got["mean_feature_best_f1"] < 1


def test_sae_from_another_set_is_refused(tmp_path, capsys):
    cfg = SynthConfig(out=str(tmp_path / "set"), n_features=8, d_model=4, tokens=512, context_size=32)
    generate(cfg, progress=False)
    sae = _relu_sae(tmp_path / "sae", np.eye(4), np.zeros(4), "another-fingerprint")
    assert main(["recovery", "--sae", str(sae), "--truth", cfg.out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained on activations of another" in err


def _assert_close(a, b):
    """Recursive equality with float tolerance (NaN equals NaN)."""
    if isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in b:
            _assert_close(a[k], b[k])
    elif isinstance(b, list):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_close(u, v)
    elif isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9)
    else:
        assert a == b


def test_absorption_page_links_lost_parents_to_their_takers(tmp_path):
    """The page beside a recovery report, in a real browser: the absorbed parent's row links to the latent
    that took its place, whose entry names that parent back."""
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By

    directions, parent, pres = _hierarchy_world(np.random.default_rng(5))
    latents = pres * 1.0
    latents[pres[:, 1], 0] = 0  # latent 1 (child 1's) fires where the parent's latent 0 is silent
    decoder = directions.copy()
    decoder[1] = directions[0] + directions[1]
    rep = recovery_metrics(directions, pres.mean(0), parent, decoder, sp.csr_matrix(pres * 1.0), latents)
    page = write_absorption_page(json.loads(json.dumps(asdict(rep))), tmp_path / "rec.json", "toy")
    driver = chromium_driver(tmp_path / "profile")
    try:
        driver.get(page.as_uri())
        row = driver.find_element(By.ID, "parent-0")
        assert f"{rep.absorption_rate:.3f}" in row.text
        row.find_element(By.LINK_TEXT, "latent 1").click()
        assert driver.current_url.endswith("#latent-1")
        taker = driver.find_element(By.ID, "latent-1")
        assert "feature 0" in taker.text and taker.is_displayed()
    finally:
        driver.quit()
