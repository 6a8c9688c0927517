"""Linear CKA: the properties that make it a similarity index, and its two estimators agreeing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.analysis.cka import FullBatchCKA, MinibatchCKA, gram_linear, hsic, linear_cka


def layered_features(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Three 'layers' over the same n examples: shared latent factors plus growing private noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g, dtype=torch.float64)
    return [
        z @ torch.randn(8, 30, generator=g, dtype=torch.float64) + noise * torch.randn(n, 30, generator=g, dtype=torch.float64)
        for noise in (0.5, 2.0, 6.0)
    ]


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def minibatch_cka(x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    est = MinibatchCKA()
    for i in range(0, len(x), batch):
        est.update([x[i : i + batch]], [y[i : i + batch]])
    return float(est.compute()[0, 0])


ESTIMATES = {
    "full_biased": lambda x, y: linear_cka(x, y),
    "full_unbiased": lambda x, y: linear_cka(x, y, unbiased=True),
    "minibatch": lambda x, y: minibatch_cka(x, y, batch=32),
}


@pytest.mark.parametrize("estimate", ESTIMATES.values(), ids=ESTIMATES.keys())
def test_cka_is_one_for_identical_and_invariant_to_rotation_and_isotropic_scale(estimate):
    x, y, _ = layered_features(128)
    assert estimate(x, x) == pytest.approx(1.0, abs=1e-9)
    base = estimate(x, y)
    assert 0.05 < base < 0.999
    q = orthogonal(x.shape[1], seed=1)
    assert estimate(x @ q, y) == pytest.approx(base, abs=1e-9)
    assert estimate(3.7 * x, 0.02 * y) == pytest.approx(base, abs=1e-9)
    # ...but not to an anisotropic rescaling of the features, so the checks above can fail.
    stretch = torch.linspace(0.05, 5.0, x.shape[1], dtype=torch.float64)
    assert abs(estimate(x * stretch, y) - base) > 1e-3


def test_biased_cka_matches_the_feature_space_formula():
    """Kornblith et al. eq. (3): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features."""
    x, y, _ = (f.numpy() for f in layered_features(100, seed=2))
    x, y = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-9)


def test_unbiased_hsic_matches_song_et_al():
    """HSIC_1 of Song et al. (2012), eq. (5), computed term by term."""
    x, y, _ = (f.numpy() for f in layered_features(40, seed=3))
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    ones = np.ones(n)
    expected = (np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))
    got = hsic(gram_linear(torch.from_numpy(x)), gram_linear(torch.from_numpy(y)), unbiased=True)
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_minibatch_estimator_agrees_with_the_full_one():
    feats = layered_features(1024, seed=4)
    full = FullBatchCKA(unbiased=True)
    mini = MinibatchCKA()
    for i in range(0, 1024, 128):
        batch = [f[i : i + 128] for f in feats]
        full.update(batch)
        mini.update(batch)
    full_m, mini_m = full.compute(), mini.compute()
    assert full_m.shape == mini_m.shape == (3, 3)
    torch.testing.assert_close(torch.diagonal(mini_m), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(mini_m, mini_m.T)
    assert (full_m[0, 1] > full_m[0, 2]) and (mini_m[0, 1] > mini_m[0, 2])  # noisier layers are less similar
    torch.testing.assert_close(mini_m, full_m, atol=0.01, rtol=0)
    # One minibatch holding every example is the full-batch unbiased estimate itself.
    one = MinibatchCKA()
    one.update(feats)
    torch.testing.assert_close(one.compute(), full_m, atol=1e-9, rtol=0)


def test_unbiased_estimators_see_no_similarity_between_independent_features():
    """Wide independent features: the biased estimate is far from 0, the unbiased ones are not."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(256, 2000, generator=g), torch.randn(256, 2000, generator=g)
    assert linear_cka(x, y) > 0.5
    assert abs(linear_cka(x, y, unbiased=True)) < 0.05
    assert abs(minibatch_cka(x, y, batch=64)) < 0.05


def test_cka_rejects_mismatched_examples_and_tiny_batches():
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(torch.randn(10, 3), torch.randn(9, 3))
    with pytest.raises(ValueError, match="at least 4 examples"):
        MinibatchCKA().update([torch.randn(3, 5)])
    with pytest.raises(ValueError, match="no minibatch"):
        MinibatchCKA().compute()
