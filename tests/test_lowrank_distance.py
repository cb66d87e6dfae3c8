"""The distance-from-optimal diagnostic against matrices with known singular values."""

import numpy as np
import pytest

from refattn import SpecError
from refattn.lowrank.distance import distance_from_optimal, table


def _with_singular_values(sigma, seed=0):
    rng = np.random.default_rng(seed)
    n = len(sigma)
    left, _ = np.linalg.qr(rng.standard_normal((n, n)))
    right, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return left @ np.diag(sigma) @ right.T, left, right


def test_floors_are_the_svd_tail_and_truncation_attains_them():
    sigma = np.array([5.0, 3.0, 2.0, 1.0, 0.5])
    p, left, right = _with_singular_values(sigma)
    truncated = left[:, :2] @ np.diag(sigma[:2]) @ right[:, :2].T  # the Eckart–Young optimum at rank 2
    found = distance_from_optimal(p, truncated, 2)
    np.testing.assert_allclose(found["frobenius_floor"], np.sqrt(4.0 + 1.0 + 0.25), rtol=1e-13)
    np.testing.assert_allclose(found["spectral_floor"], 2.0, rtol=1e-13)
    np.testing.assert_allclose(found["ratio"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(found["spectral_ratio"], 1.0, rtol=1e-12)


def test_row_sum_error_and_most_negative_entry():
    p = np.full((1, 3, 3), 1 / 3)
    implied = p.copy()
    implied[0, 1] = [0.5, 0.7, -0.1]
    found = distance_from_optimal(p, implied, 1)
    np.testing.assert_allclose(found["max_row_sum_error"], [0.1], rtol=1e-12)
    np.testing.assert_allclose(found["min_entry"], [-0.1])
    assert found["frobenius_floor"][0] < 1e-15 and found["ratio"][0] > 1e15  # P has rank 1: the floor is rounding


def test_table_ratios_are_at_least_one():
    rows = table("dilution", n=12, d=8, ranks=(2, 3))
    assert {r["mechanism"] for r in rows} == {"linformer", "nystrom", "performer"}
    assert all(r["ratio"] >= 1.0 - 1e-12 and r["spectral_ratio"] >= 1.0 - 1e-12 for r in rows)


def test_bad_input():
    with pytest.raises(SpecError, match="argument `rank`"):
        distance_from_optimal(np.eye(3), np.eye(3), 0)
    with pytest.raises(SpecError, match="argument `implied`"):
        distance_from_optimal(np.eye(3), np.eye(4), 1)
