"""Linear centered kernel alignment (CKA) between layer representations.

Two estimators:
- full batch (Kornblith et al. 2019): every image's features held at once; biased or
  unbiased HSIC;
- minibatch (Nguyen et al. 2021, used by Raghu et al. 2021): the unbiased HSIC
  estimator averaged over minibatches, so memory stays one batch whatever the number
  of images; it estimates the same quantity as the full-batch unbiased CKA.

Hand-written because neither scikit-learn nor scipy has CKA; the HSIC estimators are short.
Gram matrices are in float64: U-centring subtracts nearly equal sums.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """(n, n) linear kernel of (n, d) features."""
    x = x.flatten(1).double()
    return x @ x.T


def center_gram(gram: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T/n: centring for the biased HSIC estimator."""
    gram = gram - gram.mean(0, keepdim=True)
    return gram - gram.mean(1, keepdim=True)


def u_center_gram(gram: torch.Tensor) -> torch.Tensor:
    """U-centring (Szekely & Rizzo 2014): <U(K), U(L)> / (n (n-3)) is the unbiased HSIC of Song et al. 2012."""
    n = gram.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 examples, got {n}")
    gram = gram.clone()
    gram.fill_diagonal_(0)
    means = gram.sum(0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    gram = gram - means[:, None] - means[None, :]
    gram.fill_diagonal_(0)
    return gram


def hsic(k: torch.Tensor, l: torch.Tensor, *, unbiased: bool) -> torch.Tensor:
    """HSIC of two (n, n) Gram matrices, up to a factor common to all pairs of the same n."""
    if unbiased:
        n = k.shape[0]
        return (u_center_gram(k) * u_center_gram(l)).sum() / (n * (n - 3))
    return (center_gram(k) * center_gram(l)).sum()


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, unbiased: bool = False) -> float:
    """Full-batch linear CKA of (n, dx) and (n, dy) features of the same n examples."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares features of the same examples: got {x.shape[0]} and {y.shape[0]} rows")
    k, l = gram_linear(x), gram_linear(y)
    return float(hsic(k, l, unbiased=unbiased) / (hsic(k, k, unbiased=unbiased) * hsic(l, l, unbiased=unbiased)).sqrt())


class MinibatchCKA:
    """CKA between every layer of model A and every layer of model B, one minibatch at a time.

    `update(feats_a, feats_b)` takes one minibatch's features per layer (the same images in
    both); leave `feats_b` out to compare model A's layers with each other.
    """

    def __init__(self) -> None:
        self.cross: torch.Tensor | None = None  # (La, Lb) sum of HSIC(K_i, L_j)
        self.self_a: torch.Tensor | None = None  # (La,) sum of HSIC(K_i, K_i)
        self.self_b: torch.Tensor | None = None

    @staticmethod
    def _u_grams(feats: Sequence[torch.Tensor]) -> torch.Tensor:
        n = feats[0].shape[0]
        # Scaled so that a dot product of two rows is the unbiased HSIC of this batch.
        return torch.stack([u_center_gram(gram_linear(f)).flatten() for f in feats]) / (n * (n - 3)) ** 0.5

    def update(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor] | None = None) -> None:
        ua = self._u_grams(feats_a)
        ub = ua if feats_b is None else self._u_grams(feats_b)
        if ua.shape[1] != ub.shape[1]:
            raise ValueError("both models' features must come from the same images")
        cross, self_a, self_b = ua @ ub.T, (ua * ua).sum(1), (ub * ub).sum(1)
        if self.cross is None:
            self.cross, self.self_a, self.self_b = cross, self_a, self_b
        else:
            self.cross += cross
            self.self_a += self_a
            self.self_b += self_b

    def compute(self) -> torch.Tensor:
        """(La, Lb) CKA matrix."""
        if self.cross is None:
            raise ValueError("no minibatch was given to the CKA estimator")
        return self.cross / (self.self_a[:, None] * self.self_b[None, :]).sqrt()


class FullBatchCKA:
    """Same interface, exact full-batch estimate: keeps every image's features (memory grows with images)."""

    def __init__(self, *, unbiased: bool = False) -> None:
        self.unbiased = unbiased
        self.batches_a: list[list[torch.Tensor]] = []
        self.batches_b: list[list[torch.Tensor] | None] = []

    def update(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor] | None = None) -> None:
        self.batches_a.append([f.cpu() for f in feats_a])
        self.batches_b.append(None if feats_b is None else [f.cpu() for f in feats_b])

    def _centred(self, batches: list[list[torch.Tensor]]) -> torch.Tensor:
        centre = u_center_gram if self.unbiased else center_gram
        return torch.stack([centre(gram_linear(torch.cat(layer))).flatten() for layer in zip(*batches)])

    def compute(self) -> torch.Tensor:
        if not self.batches_a:
            raise ValueError("no minibatch was given to the CKA estimator")
        ca = self._centred(self.batches_a)
        cb = ca if self.batches_b[0] is None else self._centred(self.batches_b)
        return (ca @ cb.T) / ((ca * ca).sum(1)[:, None] * (cb * cb).sum(1)[None, :]).sqrt()


ESTIMATORS = {
    "minibatch": MinibatchCKA,
    "full": FullBatchCKA,
}
