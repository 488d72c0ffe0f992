"""bench/pursuit_refit.py's measures: root-to-node path directions and the oracle factoring of prefix rows."""

from types import SimpleNamespace

import numpy as np

from bench.pursuit_refit import oracle_factored, prefix_directions, profile

PARENT = np.array([-1, 0, 1, -1])  # a chain 0 -> 1 -> 2 and feature 3 outside the hierarchy


def test_a_path_direction_is_the_node_plus_its_ancestors_at_their_mean_magnitudes() -> None:
    got = prefix_directions(np.eye(4), PARENT, np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(got[2], np.array([1, 2, 3, 0]) / np.sqrt(14))
    np.testing.assert_allclose(got[1], np.array([1, 2, 0, 0]) / np.sqrt(5))
    np.testing.assert_allclose(got[[0, 3]], np.eye(4)[[0, 3]])


def test_oracle_factoring_leaves_a_prefix_row_only_its_own_node() -> None:
    truth = SimpleNamespace(directions=np.eye(4), parent=PARENT)
    mean = np.ones(4)
    # rows: the path 0 -> 1, feature 0 alone, feature 3; nothing holds the path to 2
    W = np.array([[1.0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 2.0]])
    got = oracle_factored(W, truth, mean)
    np.testing.assert_allclose(got, [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], atol=1e-12)
    before, after = profile(W, truth, mean), profile(got, truth, mean)
    assert before["depth 1"] == 0 and after["depth 1"] == 1 and after["paths to depth 1"] == 0
    assert before["paths to depth 1"] == 1 and after["depth 2"] == 0  # no row for 2's path: nothing to factor
