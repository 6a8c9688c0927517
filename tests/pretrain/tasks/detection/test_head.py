import math

import pytest
import torch

from pretrain.tasks.detection.head import DETRHead, sine_position_encoding
from pretrain.tasks.detection.model import Detector, build_backbone
from pretrain.checkpoint.export import save_exported
from pretrain.models import MODELS, build_model
from timm.layers import resample_abs_pos_embed


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


def test_exported_backbone_is_resampled_to_the_detection_grid(tmp_path):
    model = build_model("vit_demo", num_classes=10)
    meta = {"model": "vit_demo", "model_kwargs": {}, "num_classes": 10, "image_size": 28,
            "mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3], "run_id": None, "step": 1}
    path = save_exported(model.state_dict(), tmp_path / "vit.safetensors", meta)

    backbone, loaded_meta = build_backbone(checkpoint=str(path), model=None, kwargs={}, image_size=40)
    assert loaded_meta["mean"] == [0.2, 0.2, 0.2]
    # vit_demo: 28 px, patch 4 -> 7x7; at 40 px 10x10, interpolated in 2-D with the class token kept.
    expected = resample_abs_pos_embed(model.pos_embed.detach(), [10, 10], old_size=[7, 7], num_prefix_tokens=1)
    assert torch.allclose(backbone.pos_embed, expected)
    assert torch.equal(backbone.patch_embed.proj.weight, model.patch_embed.proj.weight)
    detector = Detector(backbone, DETRHead(in_dim=96, num_classes=1, d_model=16, num_heads=2, num_layers=1, dim_feedforward=16, num_queries=3))
    assert detector.grid == (10, 10)
    assert detector.features(torch.randn(2, 3, 40, 40)).shape == (2, 100, 96)


@pytest.mark.parametrize("name", [n for n, spec in MODELS.items() if spec.tiny])
def test_every_tiny_model_detects_forward_and_backward(name):
    backbone, _ = build_backbone(checkpoint=None, model=name, kwargs={}, image_size=64)
    head = DETRHead(in_dim=backbone.num_features, num_classes=2, d_model=16, num_heads=2, num_layers=2, dim_feedforward=16, num_queries=3)
    detector = Detector(backbone, head)
    rows, cols = detector.grid
    assert detector.features(torch.randn(1, 3, 64, 64)).shape == (1, rows * cols, backbone.num_features)
    out = detector(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 3, 3)
    (out["boxes"].sum() + out["logits"].sum()).backward()
    assert all(p.grad is not None for p in detector.parameters())

    detector.zero_grad(set_to_none=True)
    detector.train_backbone = False  # the frozen first steps skip the backbone's backward
    detector(torch.randn(1, 3, 64, 64))["boxes"].sum().backward()
    assert all(p.grad is None for p in backbone.parameters()) and head.query_pos.weight.grad is not None
