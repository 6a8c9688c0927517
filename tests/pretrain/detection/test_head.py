import math

import pytest
import torch

from pretrain.detection.head import DETRHead, sine_position_encoding
from pretrain.detection.model import Detector, build_backbone, resize_backbone


def test_sine_encoding_follows_detr_formula():
    enc = sine_position_encoding(3, 5, 8).reshape(3, 5, 8)
    # Channels 0..3 encode y, 4..7 x; pairs (sin, cos) at frequencies 1 and 1/100 (temperature^(2i/4)).
    y, x = 2 / (3 + 1e-6) * 2 * math.pi, 4 / (5 + 1e-6) * 2 * math.pi  # row 1, column 3 (1-based 2 and 4)
    expected = [math.sin(y), math.cos(y), math.sin(y / 100), math.cos(y / 100),
                math.sin(x), math.cos(x), math.sin(x / 100), math.cos(x / 100)]
    assert enc[1, 3].tolist() == pytest.approx(expected, abs=1e-5)
    flat = enc.reshape(15, 8)
    assert torch.cdist(flat, flat).add(torch.eye(15)).min() > 1e-3, "every grid cell has its own code"
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_encoding(2, 2, 6)


def test_head_outputs_every_layer_and_boxes_in_unit_square():
    head = DETRHead(in_dim=12, num_classes=3, d_model=16, num_heads=2, num_layers=3, dim_feedforward=32, num_queries=5)
    out = head(torch.randn(2, 4 * 6, 12), (4, 6))
    assert out["logits"].shape == (2, 5, 4) and out["boxes"].shape == (2, 5, 4)
    assert len(out["aux"]) == 2 and all(a["boxes"].shape == (2, 5, 4) for a in out["aux"])
    assert out["boxes"].min() >= 0 and out["boxes"].max() <= 1


def test_detector_uses_resampled_patch_grid_of_the_backbone():
    backbone, meta = build_backbone(checkpoint=None, model="vit_demo", kwargs={})
    pos_before = backbone.pos_embed.detach().clone()
    grid = resize_backbone(backbone, 40)  # vit_demo: 28 px, patch 4 -> 10x10 patches at 40 px
    assert grid == (10, 10) and meta == {}
    assert backbone.pos_embed.shape == (1, 1 + 100, pos_before.shape[-1])
    assert torch.equal(backbone.pos_embed[0, 0], pos_before[0, 0]), "the class token's embedding is kept"
    head = DETRHead(in_dim=backbone.num_features, num_classes=1, d_model=16, num_heads=2, num_layers=1, dim_feedforward=16, num_queries=3)
    detector = Detector(backbone, head, grid)
    assert detector.features(torch.randn(2, 3, 40, 40)).shape == (2, 100, backbone.num_features)
    assert detector(torch.randn(2, 3, 40, 40))["logits"].shape == (2, 3, 2)

    detector.train_backbone = False
    detector(torch.randn(1, 3, 40, 40))["boxes"].sum().backward()
    assert all(p.grad is None for p in backbone.parameters()) and head.query_pos.weight.grad is not None
