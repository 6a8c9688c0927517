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
                     batch_size: int = 256, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 features and (N,) labels, computed once and reused for all shots and seeds."""
    data.transform = build_transform(image_size, "none", mean, std)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    model.eval()
    device = next(model.parameters()).device
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False, mininterval=2):
        feats.append(pre_logits(model, images.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()
