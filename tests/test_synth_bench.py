"""The SynthSAEBench recipe reproduces its configured model within sampling error: Zipf frequencies and
their exact marginals through the hierarchy, breadth-first trees of mutually exclusive children scaled by
their parent, the Gaussian copula's pairwise co-firing, pushed-apart directions and the bias."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal, norm

from saepipe.harvest import open_store
from saepipe.harvest.config import SynthConfig
from saepipe.harvest.synth_bench import build_tree, zipf_probabilities
from saepipe.harvest.synthetic import generate, make_features, open_truth

SMALL = {"recipe": "synthsaebench", "n_features": 256, "d_model": 24, "orthogonalize_steps": 20}


def _features(**over):
    return make_features(SynthConfig(out="x", **{**SMALL, **over}))


@pytest.fixture(scope="module")
def independent():
    """No correlation: every marginal has a closed form."""
    f = _features(correlation_rank=0)
    codes = f.sample_codes(120_000, (0, 1, 0))
    return f, codes, (codes != 0).toarray()


def test_zipf_probabilities_span_the_range():
    p = zipf_probabilities(100, 0.5, 0.4, 5e-4)
    assert p[0] == pytest.approx(0.4) and p[-1] == pytest.approx(5e-4) and (np.diff(p) < 0).all()
    r = np.arange(1, 101) ** -0.5  # affine in rank ** -exponent
    assert np.allclose(np.polyfit(r, p, 1)[0] * r + np.polyfit(r, p, 1)[1], p)


def test_trees_are_breadth_first_from_the_most_frequent():
    parent, levels = build_tree(100, roots=2, branching=4, depth=3)
    assert (
        (parent[:2] == -1).all() and parent[2:6].tolist() == [0, 0, 0, 0] and parent[6:10].tolist() == [1] * 4
    )
    assert [len(lv.features) for lv in levels] == [8, 32, 58]  # 2 * 4, 8 * 4, then features run out at 100
    assert (parent[100 - 1] >= 0) and all((lv.parents < lv.features).all() for lv in levels)


def test_marginals_match_the_exact_model(independent):
    f, _, pres = independent
    emp = pres.mean(0)
    sigma = np.sqrt(f.frequencies * (1 - f.frequencies) / len(pres))
    assert (np.abs(emp - f.frequencies) < 4.5 * sigma).all()
    roots = f.depth == 0
    assert f.frequencies[roots] == pytest.approx(f.base_probability[roots], rel=0.01)  # values rarely <= 0
    deep = f.depth == 3  # clipped compensation and exclusion leave the deepest children below their base
    assert (f.frequencies[deep] < f.base_probability[deep]).mean() > 0.9


def test_children_need_their_parent_and_exclude_their_siblings(independent):
    f, codes, pres = independent
    kids = np.flatnonzero(f.parent >= 0)
    assert len(kids) == 2 * (4 + 16 + 64)  # 256 / 128 roots, branching 4, depth 3
    assert not (pres[:, kids] & ~pres[:, f.parent[kids]]).any()
    for p in np.unique(f.parent[kids]):
        assert (pres[:, f.parent == p].sum(1) <= 1).all()
    # A child's value is its own magnitude times parent value / parent mean magnitude.
    dense = codes.toarray()
    ratios, expect = [], []
    for c in kids[:40]:
        on = pres[:, c]
        p = f.parent[c]
        ratios.append((dense[on, c] / (dense[on, p] / f.mean[p])).mean())
        expect.append(f.mean[c])
    assert np.allclose(ratios, expect, rtol=0.05)


def test_copula_correlation_between_top_level_features():
    f = _features(correlation_scale=0.18, hierarchy_roots=0)  # no hierarchy: every feature is top level
    codes = f.sample_codes(200_000, (3, 1, 0))
    pres = (codes != 0).toarray()
    rho = f.factor.astype(np.float64) @ f.factor.T.astype(np.float64)
    top = np.arange(30)
    pairs = sorted(((abs(rho[i, j]), i, j) for i in top for j in top if i < j), reverse=True)[:6]
    tested_dependence = False
    for _, i, j in pairs:
        lower = norm.ppf(f.fire_probability[[i, j]])  # P(z_i > t_i, z_j > t_j) = Phi2(-t_i, -t_j; rho)
        cov = [[1, rho[i, j]], [rho[i, j], 1]]
        positive = f.frequencies[[i, j]] / f.fire_probability[[i, j]]  # P(value > 0 | fired)
        joint = multivariate_normal(mean=[0, 0], cov=cov).cdf(lower) * positive.prod()
        emp = (pres[:, i] & pres[:, j]).mean()
        sigma = np.sqrt(joint * (1 - joint) / len(pres))
        assert abs(emp - joint) < 4.5 * sigma
        tested_dependence |= abs(joint - f.frequencies[i] * f.frequencies[j]) > 6 * sigma
    assert tested_dependence, "no tested pair is distinguishable from independence"


def test_directions_pushed_apart_and_rows_carry_the_bias(tmp_path):
    pushed, raw = _features(orthogonalize_steps=200, orthogonalize_lr=0.01), _features(orthogonalize_steps=0)
    off = lambda d: ((d.astype(np.float64) @ d.T.astype(np.float64) - np.eye(len(d))) ** 2).sum()  # noqa: E731
    welch = 256**2 / 24 - 256  # the least sum of squared cosines n unit vectors in d dims can have
    assert np.allclose(np.linalg.norm(pushed.directions, axis=1), 1, atol=1e-5)
    assert off(pushed.directions) == pytest.approx(welch, rel=0.01) and off(raw.directions) > 1.05 * welch
    cfg = SynthConfig(out=str(tmp_path / "set"), tokens=4096, context_size=32, bias_norm=0.5, **SMALL)
    generate(cfg, progress=False)
    truth = open_truth(cfg.out)
    assert np.linalg.norm(truth.bias) == pytest.approx(0.5, rel=1e-5)
    x = open_store(truth.store_path).activations("synthetic").reshape(-1, 24).astype(np.float64)
    codes = truth.codes(0, 128).toarray().astype(np.float64)
    np.testing.assert_allclose(x, codes @ truth.directions + truth.bias, atol=1e-5)
    assert truth.meta["true_l0"] == pytest.approx(truth.frequencies.sum())


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_seeded_and_recorded_apart_from_the_powerlaw_fields(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        generate(SynthConfig(out=str(out), tokens=2048, context_size=32, **SMALL), progress=False)
    assert _digest(a) == _digest(b)
    recorded = open_truth(str(a)).meta["config"]
    assert (
        recorded["recipe"] == "synthsaebench" and recorded["freq_max"] == 0.4 and "n_parents" not in recorded
    )
    other = make_features(SynthConfig(out="x", seed=1, **SMALL))
    assert not np.array_equal(other.directions, open_truth(str(a)).directions)
