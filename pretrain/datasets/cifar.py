"""CIFAR-10 and CIFAR-100, "python version" (cifar-10-python.tar.gz / cifar-100-python.tar.gz).

The pickles are read by data_pipeline's CifarSource (a restricted unpickler: a planted file
cannot run code); here they are found, unpacked if need be, and checked.
"""
from __future__ import annotations

import pickle

from data_pipeline.sources import CifarSource
from pretrain.datasets.archives import DatasetFormatError, locate
from pretrain.datasets.registry import LabeledImages, register_dataset

CIFAR10_EXPECTS = ("cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta "
                   "(the python version, cifar-10-python.tar.gz), or that archive")
CIFAR100_EXPECTS = "cifar-100-python/ with train, test and meta (cifar-100-python.tar.gz), or that archive"
_UNREADABLE = (FileNotFoundError, ValueError, KeyError, AttributeError, TypeError, EOFError, pickle.UnpicklingError)


def _load(dataset: str, folder, split: str, expects: str) -> LabeledImages:
    try:
        source = CifarSource(folder, split)
    except _UNREADABLE as err:
        raise DatasetFormatError(f"{dataset}: cannot read the CIFAR python pickles in {folder}: {err!r}; expected {expects}") from None
    labels, num_classes = source.labels, len(source.class_names)
    if len(labels) != len(source.images) or labels.min() < 0 or labels.max() >= num_classes:
        raise DatasetFormatError(f"{dataset}: {folder} has {len(labels)} labels for {len(source.images)} images, "
                                 f"or labels outside [0, {num_classes})")
    return LabeledImages(source.images, labels, source.class_names)


@register_dataset("cifar10", dev_fraction=0.02)
def cifar10(root: str | None, split: str) -> LabeledImages:
    """50,000 train / 10,000 test 32x32 images, 10 classes."""
    folder = locate("cifar10", root, "data_batch_1", ("cifar-10-python.tar.gz",), CIFAR10_EXPECTS)
    return _load("cifar10", folder, split, CIFAR10_EXPECTS)


@register_dataset("cifar100", dev_fraction=0.02)
def cifar100(root: str | None, split: str) -> LabeledImages:
    """50,000 train / 10,000 test 32x32 images, the 100 fine classes."""
    folder = locate("cifar100", root, "meta", ("cifar-100-python.tar.gz",), CIFAR100_EXPECTS)
    return _load("cifar100", folder, split, CIFAR100_EXPECTS)
