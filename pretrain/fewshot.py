"""Few-shot linear evaluation by closed-form ridge regression, as big_vision's `fewshot_lsr`.

Features are standardised with the training points' statistics, a constant bias feature is
appended, targets are one-hot in {-1, 1}. One eigendecomposition of XᵀX or XXᵀ (whichever
is smaller) serves every l2 value, so a whole l2 grid costs little more than one solve.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BIAS_CONSTANT = 100.0  # large, so the bias is almost unregularised (big_vision's value)
DEFAULT_L2 = 2.0**10  # big_vision's default regulariser


@dataclass(frozen=True)
class RidgeCache:
    eigs: np.ndarray
    lhs: np.ndarray
    rhs: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def weights(self, l2: float) -> np.ndarray:
        return self.lhs @ (self.rhs / (self.eigs + l2)[:, None])

    def predict(self, x: np.ndarray, l2: float) -> np.ndarray:
        return (_with_bias((x - self.mean) / self.std) @ self.weights(l2)).argmax(1)


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def fit_ridge(x: np.ndarray, y: np.ndarray, num_classes: int) -> RidgeCache:
    x = x.astype(np.float64)
    mean = x.mean(0, keepdims=True)
    std = x.std(0, keepdims=True) + 1e-5
    xs = _with_bias((x - mean) / std)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    n, d = xs.shape
    if n >= d:
        eigs, q = np.linalg.eigh(xs.T @ xs)
        lhs, rhs = q, q.T @ (xs.T @ targets)
    else:
        eigs, q = np.linalg.eigh(xs @ xs.T)
        lhs, rhs = xs.T @ q, q.T @ targets
    return RidgeCache(eigs, lhs, rhs, mean, std)


def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """`shots` random indices per class (fewer if a class has fewer), sorted."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def fewshot_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int, shots: int, seed: int, l2: float = DEFAULT_L2) -> float:
    idx = sample_shots(train_y, shots, seed)
    cache = fit_ridge(train_x[idx], train_y[idx], num_classes)
    return float((cache.predict(test_x, l2) == test_y).mean())


def fewshot_table(train_x, train_y, test_x, test_y, *, num_classes: int, shots: list[int], seeds: list[int], l2: float = DEFAULT_L2) -> dict[int, list[float]]:
    """Accuracy per shot count, one entry per seed."""
    return {
        s: [fewshot_accuracy(train_x, train_y, test_x, test_y, num_classes=num_classes, shots=s, seed=seed, l2=l2) for seed in seeds]
        for s in shots
    }
