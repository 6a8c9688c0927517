"""Registry of transfer data sets. Each loader reads a data set's official format from disk.

A loader takes (root, split) and returns `LabeledImages`; splits are "train", "test" and,
for lr selection, "dev_train"/"dev_val" carved out of train as the ViT paper does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

DATASETS: dict[str, Callable[..., "LabeledImages"]] = {}


def register_dataset(name: str):
    def wrap(fn):
        DATASETS[name] = fn
        return fn

    return wrap


@dataclass
class LabeledImages(Dataset):
    """Images (arrays HxWxC uint8, or file paths) with integer labels; yields (PIL RGB, label)."""

    images: Sequence
    labels: np.ndarray
    class_names: list[str]
    transform: Callable | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> Image.Image:
        item = self.images[i]
        img = Image.fromarray(item) if isinstance(item, np.ndarray) else Image.open(item)
        return img.convert("RGB")

    def __getitem__(self, i: int):
        img = self.load(i)
        return (self.transform(img) if self.transform else img), int(self.labels[i])

    def subset(self, idx: np.ndarray) -> "LabeledImages":
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return LabeledImages(images, self.labels[idx], self.class_names, self.transform)


def dev_split(data: LabeledImages, fraction: float, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """Hold out `fraction` of train for hyper-parameter selection (2 % CIFAR, 10 % Pets/Flowers)."""
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, int(round(fraction * len(data))))
    return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))


def load_dataset(name: str, root: str | None, split: str, *, dev_fraction: float | None = None) -> LabeledImages:
    """`split` in train/test, or dev_train/dev_val: train minus/only its held-out `dev_fraction`."""
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    if split in ("dev_train", "dev_val"):
        if dev_fraction is None:
            raise ValueError(f"split {split!r} needs dev_fraction")
        dev_train, dev_val = dev_split(DATASETS[name](root, "train"), dev_fraction)
        return dev_train if split == "dev_train" else dev_val
    return DATASETS[name](root, split)


@register_dataset("digits")
def digits(root: str | None, split: str) -> LabeledImages:
    """scikit-learn's 8x8 handwritten digits (shipped inside the package): 1297 train, 500 test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images / 16.0 * 255).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(pixels))  # fixed split, same for everyone
    idx = np.sort(order[500:] if split == "train" else order[:500])
    if split not in ("train", "test"):
        raise ValueError(f"digits has splits train/test, not {split!r}")
    return LabeledImages(pixels[idx], bunch.target[idx].astype(np.int64), [str(d) for d in range(10)])
