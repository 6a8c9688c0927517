"""Labelled image data sets for transfer and few-shot evaluation, looked up by name."""
from pretrain.datasets.registry import DATASETS, LabeledImages, load_dataset, register_dataset

__all__ = ["DATASETS", "LabeledImages", "load_dataset", "register_dataset"]
