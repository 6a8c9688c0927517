"""Labelled image data sets for transfer and few-shot evaluation, looked up by name."""
from pretrain.datasets import cifar, digits, folder, oxford  # noqa: F401  (each registers its data sets)
from pretrain.datasets.archives import DatasetFormatError
from pretrain.datasets.registry import DATASETS, LabeledImages, dataset_spec, dev_split, load_dataset, register_dataset

__all__ = ["DATASETS", "DatasetFormatError", "LabeledImages", "dataset_spec", "dev_split", "load_dataset", "register_dataset"]
