"""Registry of transfer data sets. Each loader reads a data set's official format from disk.

A loader takes (root, split) with split "train" or "test" and returns `LabeledImages`; for lr
and l2 selection `dev_split` carves a dev split out of train as the ViT paper does, with each
data set's own dev fraction (2 % CIFAR, 10 % Pets and Flowers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "test")


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


@dataclass(frozen=True)
class DatasetSpec:
    loader: Callable[[str | None, str], LabeledImages]
    dev_fraction: float  # share of train held out to choose hyper-parameters (ViT paper, App. B.1.1)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, *, dev_fraction: float):
    def wrap(fn):
        DATASETS[name] = DatasetSpec(fn, dev_fraction)
        return fn

    return wrap


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def dev_split(data: LabeledImages, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (dev_train, dev_val): `fraction` of train held out at random, both sorted."""
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, int(round(fraction * len(data))))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def load_dataset(name: str, root: str | None, split: str) -> LabeledImages:
    """`split` "train" or "test" of data set `name`; `dev_split` carves the dev split out of train."""
    spec = dataset_spec(name)
    if split not in SPLITS:
        raise ValueError(f"split {split!r} of {name}: choose one of {', '.join(SPLITS)}")
    return spec.loader(root, split)
