"""One loader, two starts: fine-tuning and detection drop the whole pretraining head, few-shot reads the pre-logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pretrain.tasks.detection.model import build_backbone
from pretrain.evaluation.features import pre_logits
from pretrain.checkpoint.weights import load_exported
from tests.pretrain.transfer.conftest import export_tiny_model


@pytest.fixture
def jft_style_export(tmp_path):
    """A vit_demo exported with the tanh pre-logits head (`pre_logits_size`), as every JFT/i21k recipe sets."""
    return export_tiny_model(tmp_path / "model.safetensors", num_classes=10, pre_logits_size=32)


def test_fine_tuning_starts_from_the_backbone_and_one_zero_d_by_k_layer(jft_style_export):
    exported, _ = load_exported(jft_style_export)
    tuned, meta = load_exported(jft_style_export, num_classes=10)  # as many classes as pretraining: still a new head
    assert not any(k.startswith("pre_logits") for k in tuned.state_dict())  # the tanh layer went with the head
    assert isinstance(tuned.head, nn.Linear) and tuned.head.weight.shape == (10, 96)  # D x K, D the width
    assert not tuned.head.weight.any() and not tuned.head.bias.any()
    assert "pre_logits_size" not in meta["model_kwargs"] and meta["num_classes"] == 10
    backbone = {k: v for k, v in exported.state_dict().items() if not k.startswith(("head.", "pre_logits."))}
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in backbone.items())
    assert not tuned(torch.randn(2, 3, 28, 28)).any()  # a zero head: the first steps leave the features alone


def test_few_shot_reads_the_tanh_pre_logits(jft_style_export):
    model, meta = load_exported(jft_style_export)
    assert meta["model_kwargs"] == {"pre_logits_size": 32}
    images = torch.randn(4, 3, 28, 28)
    feats = pre_logits(model, images)
    with torch.no_grad():
        expected = torch.tanh(model.pre_logits.fc(model.fc_norm(model.forward_features(images)[:, 0])))
    assert feats.shape == (4, 32) and feats.abs().max() < 1
    torch.testing.assert_close(feats, expected)


def test_detection_backbone_has_no_pretraining_head(jft_style_export):
    backbone, meta = build_backbone(checkpoint=str(jft_style_export), model=None, kwargs={}, image_size=56)
    assert not [k for k in backbone.state_dict() if k.startswith(("head.", "pre_logits."))]
    assert tuple(backbone.patch_embed.grid_size) == (14, 14) and meta["image_size"] == 56


def test_weights_of_another_model_fail_naming_the_file(tmp_path):
    path = export_tiny_model(tmp_path / "model.safetensors")
    side = path.with_suffix(".json")
    side.write_text(side.read_text().replace('"model_kwargs": {}', '"model_kwargs": {"depth": 2}'))
    with pytest.raises(KeyError, match="model.safetensors.*unexpected.*blocks.2"):
        load_exported(path)
