"""Frozen pre-logit features of a model over a labelled data set."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_pipeline.decode import build_transform
from pretrain.datasets import LabeledImages


@torch.no_grad()
def pre_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(images), pre_logits=True)


@torch.no_grad()
def extract_features(model: nn.Module, data: LabeledImages, *, image_size: int, mean, std,
                     batch_size: int = 256, num_workers: int = 0, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 features and (N,) labels, computed once and reused for all shots and seeds.

    Runs in the model's device and dtype (bf16 inside a bf16 DeepSpeed engine); restores its
    train/eval mode, so it can be called in the middle of pretraining.
    """
    data.transform = build_transform(image_size, "none", mean, std)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False, mininterval=2):
        feats.append(pre_logits(model, images.to(param.device, param.dtype)).float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()
