"""Closed-form few-shot ridge regression, checked against scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from pretrain.fewshot import BIAS_CONSTANT, fewshot_table, fit_ridge, sample_shots


def sklearn_predictions(x, y, x_test, num_classes, l2):
    mean, std = x.mean(0), x.std(0) + 1e-5
    pad = lambda a: np.pad((a - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    return Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(pad(x), targets).predict(pad(x_test)).argmax(1)


@pytest.mark.parametrize("n,d", [(200, 16), (30, 64)], ids=["XtX", "XXt"])  # both solve branches
@pytest.mark.parametrize("l2", [2.0**-3, 2.0**10])
def test_ridge_matches_sklearn(n, d, l2):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, d)) * 2
    y = rng.integers(0, 5, n)
    x = centres[y] + rng.normal(size=(n, d))
    x_test = centres[rng.integers(0, 5, 100)] + rng.normal(size=(100, d))
    ours = fit_ridge(x, y, 5).predict(x_test, l2)
    np.testing.assert_array_equal(ours, sklearn_predictions(x, y, x_test, 5, l2))


def test_one_cache_serves_every_l2_like_separate_solves():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 8)), rng.integers(0, 3, 50)
    cache = fit_ridge(x, y, 3)
    xs = np.pad((x - x.mean(0)) / (x.std(0) + 1e-5), ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    t = 2.0 * np.eye(3)[y] - 1
    for l2 in (0.01, 1.0, 1000.0):
        direct = np.linalg.solve(xs.T @ xs + l2 * np.eye(9), xs.T @ t)
        np.testing.assert_allclose(cache.weights(l2), direct, rtol=1e-6, atol=1e-8)


def test_shots_are_per_class_and_seeded():
    labels = np.repeat(np.arange(4), 10)
    idx = sample_shots(labels, 3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3, 3]
    assert (idx == sample_shots(labels, 3, seed=0)).all() and not (idx == sample_shots(labels, 3, seed=1)).all()


def test_separable_features_give_high_accuracy_with_more_shots():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(10, 32)) * 3
    ytr, yte = rng.integers(0, 10, 500), rng.integers(0, 10, 300)
    xtr, xte = centres[ytr] + rng.normal(size=(500, 32)), centres[yte] + rng.normal(size=(300, 32))
    table = fewshot_table(xtr, ytr, xte, yte, num_classes=10, shots=[1, 10], seeds=[0, 1, 2])
    assert np.mean(table[10]) > 0.9 and np.mean(table[10]) >= np.mean(table[1])
