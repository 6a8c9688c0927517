"""Closed-form few-shot ridge regression, checked against scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from pretrain.evaluation.fewshot_ridge import BIAS_CONSTANT, L2_GRID, FeatureSet, fewshot_table, fit_ridge, sample_shots, select_l2, solve_ridge


def sklearn_predictions(x, y, x_test, num_classes, l2):
    mean, std = x.mean(0), x.std(0) + 1e-5
    pad = lambda a: np.pad((a - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    return Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(pad(x), targets).predict(pad(x_test)).argmax(1)


@pytest.mark.parametrize("n,d", [(200, 16), (30, 64)], ids=["XtX", "XXt"])  # both branches of each solver
@pytest.mark.parametrize("l2", [2.0**-3, 2.0**10])
def test_ridge_matches_sklearn(n, d, l2):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, d)) * 2
    y = rng.integers(0, 5, n)
    x = centres[y] + rng.normal(size=(n, d))
    x_test = centres[rng.integers(0, 5, 100)] + rng.normal(size=(100, d))
    expected = sklearn_predictions(x, y, x_test, 5, l2)
    np.testing.assert_array_equal(fit_ridge(x, y, 5).predict(x_test, l2), expected)  # eigen-basis, any l2
    weights, standardise = solve_ridge(x, y, 5, l2)  # one l2, one Cholesky solve
    np.testing.assert_array_equal((standardise(x_test) @ weights).argmax(1), expected)


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


def _features(seed: int, noise: float, d: int = 24, classes: int = 4, n: int = 300) -> FeatureSet:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y, y_test = rng.integers(0, classes, n), rng.integers(0, classes, 100)
    x, x_test = centres[y] + noise * rng.normal(size=(n, d)), centres[y_test] + noise * rng.normal(size=(100, d))
    return FeatureSet(x, y, x_test, y_test, classes, dev_val=np.arange(0, n, 5))


def test_grid_predictions_equal_one_solve_per_l2():
    f = _features(3, 1.0)
    cache = fit_ridge(f.train_x[:40], f.train_y[:40], 4)
    grid = [2.0**-10, 1.0, 2.0**19]
    for row, l2 in zip(cache.predict_grid(f.test_x, grid), grid):
        np.testing.assert_array_equal(row, cache.predict(f.test_x, l2))


def test_one_l2_is_chosen_across_data_sets_on_held_out_train_like_sklearn():
    """The l2 with the best dev accuracy averaged over data sets, shots and seeds; sklearn's Ridge recomputes it."""
    sets = {"easy": _features(4, 0.5), "noisy": _features(5, 3.0, d=60)}
    l2s = [2.0**i for i in range(-10, 20, 3)]
    shots, seeds = [1, 5], [0, 1]
    chosen, curve = select_l2(sets, shots=shots, seeds=seeds, l2s=l2s)
    expected = []
    for f in sets.values():
        pool = np.setdiff1d(np.arange(len(f.train_y)), f.dev_val)
        accs = [[(sklearn_predictions(f.train_x[idx], f.train_y[idx], f.train_x[f.dev_val], 4, l2) == f.train_y[f.dev_val]).mean()
                 for l2 in l2s] for k in shots for s in seeds for idx in [pool[sample_shots(f.train_y[pool], k, s)]]]
        expected.append(np.mean(accs, axis=0))
    np.testing.assert_allclose(curve, np.mean(expected, axis=0))
    assert chosen == l2s[int(np.argmax(curve))]
    # the test split plays no part in the choice
    for f in sets.values():
        f.test_y = np.random.default_rng(9).permutation(f.test_y)
    assert select_l2(sets, shots=shots, seeds=seeds, l2s=l2s)[0] == chosen


def test_scenic_grid():
    assert L2_GRID[0] == 2.0**-10 and L2_GRID[-1] == 2.0**19 and len(L2_GRID) == 30
