"""bench/path_code.py's measure of how well one direction per root-to-leaf path codes a hierarchy."""

import numpy as np
import scipy.sparse as sp

from bench.path_code import path_directions, tree_vectors

PARENT = np.array([-1, 0, 0, -1])  # root 0 with children 1 and 2; feature 3 outside the hierarchy


def test_each_active_tree_is_one_row_with_its_vector_from_each_depth_and_its_deepest_node() -> None:
    codes = sp.csr_matrix(np.array([[2.0, 3.0, 0, 1.0], [1.0, 0, 0, 0], [0, 0, 0, 5.0]]))
    vectors, deepest, in_tree = tree_vectors(codes, np.eye(4), PARENT)
    assert in_tree.tolist() == [True, True, True, False]
    assert deepest.tolist() == [1, 0]  # token 2 has no tree: no row
    np.testing.assert_array_equal(vectors[0], [[2, 3, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(vectors[1], [[0, 3, 0, 0], [0, 0, 0, 0]])


def test_the_residual_is_what_the_best_single_direction_of_each_path_leaves() -> None:
    codes = sp.csr_matrix(np.array([[2.0, 3.0, 0, 0], [2.0, 1.0, 0, 0], [1.0, 0, 4.0, 0], [3.0, 0, 0, 0]]))
    vectors, deepest, _ = tree_vectors(codes, np.eye(4), PARENT)
    _, residual = path_directions(vectors, deepest)
    # Path 0 -> 1 has two different vectors: the residual is the smaller eigenvalue of their Gram matrix;
    # the paths 0 -> 2 and 0 alone are seen once, so one direction fits each exactly.
    rows = np.array([[2.0, 3.0], [2.0, 1.0]])
    assert np.isclose(residual, np.linalg.eigvalsh(rows.T @ rows)[0])
