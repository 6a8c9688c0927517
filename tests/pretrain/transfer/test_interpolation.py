"""Fine-tuning at a higher resolution starts from the function the model had at its own resolution."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from pretrain.checkpoint.export import save_exported
from pretrain.evaluation.features import pre_logits
from pretrain.models import build_model
from pretrain.checkpoint.weights import load_exported


@pytest.fixture(scope="module")
def smooth_export(tmp_path_factory):
    """vit_demo (28 px, 7x7 patches) with 100 classes and a smooth position embedding, as training makes it."""
    torch.manual_seed(0)
    model = build_model("vit_demo", num_classes=100)
    y, x = torch.meshgrid(torch.linspace(0, 1, 7), torch.linspace(0, 1, 7), indexing="ij")
    waves = torch.stack([torch.sin(math.pi * (a * x + b * y)) for a in range(3) for b in range(3)], -1).reshape(49, 9)
    with torch.no_grad():
        model.pos_embed[0, 1:] = waves @ torch.randn(9, 96) * 0.5
    meta = {"model": "vit_demo", "model_kwargs": {}, "num_classes": 100, "image_size": 28, "mean": [0.5] * 3,
            "std": [0.5] * 3, "run_id": None, "step": 0}
    return save_exported(model.state_dict(), tmp_path_factory.mktemp("smooth") / "model.safetensors", meta)


def smooth_image(size: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, 28), torch.linspace(0, 1, 28), indexing="ij")
    img = torch.stack([torch.sin(2 * x + 1) * torch.cos(3 * y), torch.cos(2.5 * x * y), x - y])[None]
    return F.interpolate(img, size=(size, size), mode="bicubic", align_corners=False) if size != 28 else img


@torch.no_grad()
@pytest.mark.parametrize("size", [56, 84])
def test_interpolated_model_ranks_the_classes_as_the_original(smooth_export, size):
    original, _ = load_exported(smooth_export)
    resized, meta = load_exported(smooth_export, image_size=size)
    assert meta["image_size"] == size and resized.pos_embed.shape[1] == 1 + (size // 4) ** 2
    a, b = original(smooth_image(28))[0].numpy(), resized(smooth_image(size))[0].numpy()
    assert spearmanr(a, b).statistic > 0.98
    assert np.argmax(a) == np.argmax(b) and set(np.argsort(-a)[:5]) == set(np.argsort(-b)[:5])
    # With an untrained table of the same scale instead (weights dropped on load), the ranking drifts clearly.
    table = resized.pos_embed[0, 1:]
    table.copy_(torch.randn_like(table) * table.std())
    assert spearmanr(a, resized(smooth_image(size))[0].numpy()).statistic < 0.95


@torch.no_grad()
def test_fine_tuning_model_keeps_the_features_under_a_zero_head(smooth_export):
    original, _ = load_exported(smooth_export)
    tuned, meta = load_exported(smooth_export, image_size=56, num_classes=3)
    assert meta["num_classes"] == 3 and not tuned(smooth_image(56)).any()
    a, b = pre_logits(original, smooth_image(28)), pre_logits(tuned, smooth_image(56))
    assert F.cosine_similarity(a, b).item() > 0.99
