"""Kernel Inception Distance (latentdiff.metrics.kernel_inception_distance) against torch-fidelity's KID on random
features (its own subset draws, its polynomial kernel), and the unbiased estimator against the published formula
written out pair by pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import kid_features_to_metric

from latentdiff import metrics
from latentdiff.errors import UserError


def features(n: int, dim: int, shift: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, (n, dim))


def test_matches_torch_fidelity_on_random_features():
    f1, f2 = features(300, 64, 0.0, 0), features(280, 64, 0.3, 1)
    for subsets, size in [(10, 50), (3, 280), (1, 2)]:
        ours = metrics.kernel_inception_distance(f1, f2, subsets=subsets, subset_size=size, seed=2020)
        theirs = kid_features_to_metric(
            torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=subsets, kid_subset_size=size, rng_seed=2020,
            verbose=False,
        )  # fmt: skip
        np.testing.assert_allclose(ours[0], theirs["kernel_inception_distance_mean"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(ours[1], theirs["kernel_inception_distance_std"], rtol=1e-6, atol=1e-12)


def test_unbiased_mmd2_is_the_published_formula():
    x, y = features(7, 5, 0.0, 2), features(7, 5, 1.0, 3)
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert metrics.polynomial_mmd2_unbiased(x, y) == pytest.approx(within - 2 * cross, rel=1e-12)
    # unbiased: two samples of one distribution score ~0 on average (FID's bias would not), shifted ones do not
    same = metrics.kernel_inception_distance(features(400, 16, 0, 4), features(400, 16, 0, 5), 50, 100, 0)
    apart = metrics.kernel_inception_distance(features(400, 16, 0, 4), features(400, 16, 0.5, 5), 50, 100, 0)
    assert abs(same[0]) < 3 * same[1] / np.sqrt(50) + 1e-3 and apart[0] > 10 * abs(same[0])


def test_bad_subset_sizes_are_one_line_errors():
    f = features(10, 4, 0.0, 0)
    for size in (1, 11):
        with pytest.raises(UserError, match="subset_size") as info:
            metrics.kernel_inception_distance(f, f, subsets=2, subset_size=size, seed=0)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="one D"):
        metrics.kernel_inception_distance(f, features(10, 5, 0.0, 0), subsets=2, subset_size=4, seed=0)
