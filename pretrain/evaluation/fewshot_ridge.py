"""Few-shot linear evaluation by closed-form ridge regression, as big_vision's `fewshot_lsr`.

Features are standardised with the training points' statistics, a constant bias feature is
appended, targets are one-hot in {-1, 1}. One eigendecomposition of XᵀX or XXᵀ (whichever
is smaller) serves every l2 value, so scenic's whole l2 grid costs little more than one solve.
One l2 is chosen for all data sets: the one with the best mean accuracy on each data set's
held-out part of train (its dev split), over every shot count and seed; test is only scored
with that l2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

BIAS_CONSTANT = 100.0  # large, so the bias is almost unregularised (big_vision's value)
DEFAULT_L2 = 2.0**10  # big_vision's default regulariser
L2_GRID = tuple(2.0**i for i in range(-10, 20))  # scenic's fewshot l2_regs


@dataclass(frozen=True)
class Standardiser:
    """Train statistics; maps features to standardised ones plus the constant bias feature."""

    mean: np.ndarray
    std: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        xs = (x - self.mean) / self.std
        return np.concatenate([xs, np.full((len(xs), 1), BIAS_CONSTANT)], axis=1)


def _design(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, Standardiser]:
    x = x.astype(np.float64)
    standardise = Standardiser(x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5)
    targets = np.full((len(y), num_classes), -1.0)
    targets[np.arange(len(y)), y] = 1.0
    return standardise(x), targets, standardise


@dataclass(frozen=True)
class RidgeCache:
    """Ridge solutions for every l2 at once: W(l2) = lhs diag(1 / (eigs + l2)) rhs."""

    eigs: np.ndarray
    lhs: np.ndarray
    rhs: np.ndarray
    standardise: Standardiser

    def weights(self, l2: float) -> np.ndarray:
        return self.lhs @ (self.rhs / (self.eigs + l2)[:, None])

    def predict(self, x: np.ndarray, l2: float) -> np.ndarray:
        return (self.standardise(x) @ self.weights(l2)).argmax(1)

    def predict_grid(self, x: np.ndarray, l2s: Sequence[float]) -> np.ndarray:
        """(len(l2s), N) predictions: `x` is projected once, each l2 only rescales the eigen-basis."""
        projected = self.standardise(x) @ self.lhs
        scaled = self.rhs[None] / (self.eigs[None, :, None] + np.asarray(l2s, dtype=np.float64)[:, None, None])
        return (projected[None] @ scaled).argmax(2)


def fit_ridge(x: np.ndarray, y: np.ndarray, num_classes: int) -> RidgeCache:
    """One eigendecomposition of the smaller Gram matrix, for a whole l2 grid."""
    xs, targets, standardise = _design(x, y, num_classes)
    n, d = xs.shape
    if n >= d:
        eigs, q = np.linalg.eigh(xs.T @ xs)
        lhs, rhs = q, q.T @ (xs.T @ targets)
    else:
        eigs, q = np.linalg.eigh(xs @ xs.T)
        lhs, rhs = xs.T @ q, q.T @ targets
    return RidgeCache(eigs, lhs, rhs, standardise)


def solve_ridge(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float) -> tuple[np.ndarray, Standardiser]:
    """Weights for one l2: a Cholesky solve of the smaller system, cheaper than an eigendecomposition."""
    from scipy.linalg import solve

    xs, targets, standardise = _design(x, y, num_classes)
    n, d = xs.shape
    if n >= d:
        return solve(xs.T @ xs + l2 * np.eye(d), xs.T @ targets, assume_a="pos"), standardise
    return xs.T @ solve(xs @ xs.T + l2 * np.eye(n), targets, assume_a="pos"), standardise


def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """`shots` random indices per class (fewer if a class has fewer), sorted."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


@dataclass
class FeatureSet:
    """One data set's frozen features, computed once and reused for every l2, shot count and seed."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    dev_val: np.ndarray  # indices of train held out to choose l2


def dev_accuracy(features: FeatureSet, *, shots: Sequence[int], seeds: Sequence[int], l2s: Sequence[float]) -> np.ndarray:
    """Accuracy on the held-out part of train per l2, averaged over shot counts and seeds."""
    held_out = np.zeros(len(features.train_y), bool)
    held_out[features.dev_val] = True
    pool = np.flatnonzero(~held_out)
    x_val, y_val = features.train_x[held_out], features.train_y[held_out]
    accs = []
    for k in shots:
        for seed in seeds:
            idx = pool[sample_shots(features.train_y[pool], k, seed)]
            cache = fit_ridge(features.train_x[idx], features.train_y[idx], features.num_classes)
            accs.append((cache.predict_grid(x_val, l2s) == y_val).mean(1))
    return np.mean(accs, axis=0)


def select_l2(feature_sets: dict[str, FeatureSet], *, shots: Sequence[int], seeds: Sequence[int],
              l2s: Sequence[float] = L2_GRID) -> tuple[float, np.ndarray]:
    """The one l2 with the best dev accuracy averaged over data sets, and that mean accuracy per l2."""
    curve = np.mean([dev_accuracy(f, shots=shots, seeds=seeds, l2s=l2s) for f in feature_sets.values()], axis=0)
    return float(l2s[int(np.argmax(curve))]), curve


def fewshot_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int, shots: int, seed: int, l2: float = DEFAULT_L2) -> float:
    idx = sample_shots(train_y, shots, seed)
    weights, standardise = solve_ridge(train_x[idx], train_y[idx], num_classes, l2)
    return float(((standardise(test_x) @ weights).argmax(1) == test_y).mean())


def fewshot_table(train_x, train_y, test_x, test_y, *, num_classes: int, shots: Sequence[int], seeds: Sequence[int],
                  l2: float = DEFAULT_L2) -> dict[int, list[float]]:
    """Test accuracy per shot count, one entry per seed; shots are drawn from all of train."""
    return {
        s: [fewshot_accuracy(train_x, train_y, test_x, test_y, num_classes=num_classes, shots=s, seed=seed, l2=l2) for seed in seeds]
        for s in shots
    }
