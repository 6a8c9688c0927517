"""scikit-learn's 8x8 handwritten digits, shipped inside the package: nothing to download."""
from __future__ import annotations

import numpy as np

from pretrain.datasets.registry import LabeledImages, register_dataset


@register_dataset("digits", dev_fraction=0.1)
def digits(root: str | None, split: str) -> LabeledImages:
    """1,297 train / 500 test images, 10 classes; a fixed split, the same for everyone."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images / 16.0 * 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(pixels))
    idx = np.sort(order[500:] if split == "train" else order[:500])
    return LabeledImages(pixels[idx], bunch.target[idx].astype(np.int64), [str(d) for d in range(10)])
