"""Seed stability on hand-built dictionaries: a dictionary agrees 100% with itself up to a permutation and the
signs of its rows, random dictionaries agree only at the random-direction baseline, and a dictionary that
shares a known half of its rows agrees on exactly that half (plain and weighted by firing)."""

from __future__ import annotations

import numpy as np
import pytest

from saepipe.analyze.stability import (
    baseline_for,
    best_abs_cos,
    random_directions,
    seed_groups,
    stability,
    verdict,
)

D, M = 64, 96


def test_a_permuted_sign_flipped_copy_agrees_completely():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, D)) * rng.uniform(0.5, 2.0, (M, 1))  # row norms do not matter
    perm = rng.permutation(M)
    signs = rng.choice([-1.0, 1.0], M)[:, None]
    b = a[perm] * signs * 3.0
    st = stability(a, b, rng.integers(1, 100, M), rng.integers(1, 100, M))
    assert (signs < 0).any() and (perm != np.arange(M)).any(), "vacuous: no permutation or no sign flip"
    assert st.agreement == 1.0 and st.a_to_b == 1.0 and st.b_to_a == 1.0 and st.weighted == 1.0
    assert st.median_best_cos == pytest.approx(1.0)
    assert st.baseline < 0.05  # random directions in 64 dims are nowhere near |cos| 0.7


def test_random_dictionaries_agree_at_the_baseline():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((M, D)), rng.standard_normal((M, D))
    st = stability(a, b, threshold=0.3)  # a threshold random pairs do cross sometimes: not a vacuous 0 = 0
    assert 0.05 < st.baseline < 0.95
    assert st.agreement == pytest.approx(st.baseline, abs=0.1)
    assert st.median_best_cos == pytest.approx(st.baseline_median_best_cos, abs=0.03)
    assert st.weighted is None


def test_half_shared_rows_agree_on_exactly_that_half_and_weights_count_firing():
    rng = np.random.default_rng(2)
    shared = random_directions(M // 2, D, seed=3)
    a = np.concatenate([shared, random_directions(M // 2, D, seed=4)])
    b = np.concatenate([shared[::-1], random_directions(M // 2, D, seed=5)])
    fires = np.concatenate([np.full(M // 2, 30), np.full(M // 2, 10)])  # the shared half fires 3x as often
    st = stability(a, b, fires, fires)
    assert st.agreement == 0.5
    assert st.weighted == pytest.approx(0.75)  # 30 / (30 + 10)
    assert (best_abs_cos(a, b)[: M // 2] > 0.999).all() and (best_abs_cos(a, b)[M // 2 :] < 0.7).all()
    del rng


def test_best_abs_cos_blocks_equal_the_whole_matrix():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((30, 8))
    ua = a / np.linalg.norm(a, axis=1, keepdims=True)
    ub = b / np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(best_abs_cos(a, b, block=7), np.abs(ua @ ub.T).max(1), rtol=1e-12)


def test_replicates_pair_up_and_the_verdict_reads_the_worst_pair():
    cfgs = [
        {"architecture": "topk", "d_sae": 512, "k": 32},
        {"architecture": "topk", "d_sae": 512, "k": 32},  # the second seed
        {"architecture": "topk", "d_sae": 1024, "k": 32},
        {"architecture": "relu", "d_sae": 1024},
    ]
    ladder, pairs = seed_groups(cfgs)
    assert ladder == [0, 2, 3] and pairs == [(0, 1)]
    budgets = [{"architecture": "topk", "d_sae": 512, "k": 32, "tokens": t} for t in (1000, 2000)]
    assert seed_groups(budgets) == ([0, 1], []), "two budgets of one width are not seed replicates"
    pair = {"architecture": "topk", "d_sae": 512, "k": 32, "stability": {"agreement": 0.2, "threshold": 0.7}}
    assert baseline_for({"architecture": "topk", "d_sae": 1024, "k": 32}, [pair]) is pair
    assert baseline_for({"architecture": "relu", "d_sae": 1024, "k": None}, [pair]) is None
    low = verdict([pair], min_agreement=0.5)
    assert low["readable"] is False and "NOT READABLE" in low["message"] and "20.0%" in low["message"]
    assert verdict([pair], min_agreement=0.1)["readable"] is True
    assert verdict([], 0.5)["readable"] is None
