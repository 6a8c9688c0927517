"""Capture and the whole analysis pass on every tiny model of the registry (and a timm ResNet)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pretrain.analysis.capture import attention_modules, capture_attention, capture_representations, recording
from pretrain.analysis.cka import MinibatchCKA
from pretrain.analysis.run import Subject, analyze, batched
from pretrain.models import MODELS, build_model

# The registry's CPU-sized variants, plus GPSA blocks (ConViT), which no tiny variant has yet.
TINY_MODELS = {name: (name, {}) for name, spec in MODELS.items() if spec.tiny}
TINY_MODELS["vit_demo+gpsa"] = ("vit_demo", {"gpsa_blocks": 2})


def tiny(case: str) -> tuple[torch.nn.Module, int]:
    name, overrides = TINY_MODELS[case]
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, **overrides).eval()
    size = model.patch_embed.img_size
    return model, size if isinstance(size, int) else size[0]


def test_every_family_is_covered():
    assert {"vit_demo", "pervit_demo"} <= set(TINY_MODELS)
    model, _ = tiny("vit_demo+gpsa")
    assert [type(b.attn).__name__ for b in model.blocks] == ["GPSA", "GPSA", "MHSA", "MHSA"]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_capture_sees_attention_probabilities_and_leaves_the_model_as_it_was(name):
    model, size = tiny(name)
    x = torch.randn(2, 3, size, size)
    fused_before = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    with torch.no_grad():
        expected = model(x)
        maps: dict[int, torch.Tensor] = {}
        with recording(model, on_attention=maps.__setitem__):
            got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)  # the unfused path computes the same
    assert {m: m.fused_attn for m in fused_before} == fused_before
    assert not any(m._forward_hooks for m in model.modules())
    assert len(maps) == len(attention_modules(model)) > 0
    for probs in maps.values():
        b, h, n, n2 = probs.shape
        assert (b, n) == (2, n2) and h >= 1
        assert probs.min() >= 0
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, h, n))


def test_resnet_layers_are_its_residual_blocks():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    reps = capture_representations(model, torch.randn(4, 3, 32, 32))
    names = []
    with recording(model, on_representation=lambda i, t: None) as (_, names):
        pass
    assert names == ["act1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    assert [r.shape for r in reps][-1] == (4, 512)  # layer4 output at 1x1, flattened
    with pytest.raises(ValueError, match="no `attn_drop` modules"):
        capture_attention(model, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_analysis_pass_on_each_model_against_a_resnet(name):
    model, size = tiny(name)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size + 4, size, 3), dtype=np.uint8)) for _ in range(8)]
    subject = Subject(name, model, size, (0.5,) * 3, (0.5,) * 3)
    reference = Subject("resnet18", timm.create_model("resnet18", pretrained=False, num_classes=0), size, (0.5,) * 3, (0.5,) * 3)
    result = analyze(subject, batched(images, 4), reference=reference, rollout_images=3)

    assert result.num_images == 8
    assert len(result.attention_distance) == len(result.attention_layers) == len(attention_modules(model))
    farthest = math.hypot(size, size)
    assert all(0 < d < farthest for heads in result.attention_distance for d in heads)
    layers = len(result.layers)
    assert result.cka.shape == (layers, layers) and layers >= 2
    np.testing.assert_allclose(np.diag(result.cka), 1.0, atol=1e-9)
    np.testing.assert_allclose(result.cka, result.cka.T, atol=1e-9)
    assert result.cka_cross.shape == (layers, 9) and np.isfinite(result.cka_cross).all()
    assert (np.abs(result.cka_cross) <= 1 + 1e-9).all()
    # The pass pairs each batch's layers of both models as a direct computation does.
    direct = MinibatchCKA()
    for batch in batched(images, 4):
        direct.update(capture_representations(model, subject.batch(batch, "cpu")),
                      capture_representations(reference.model, reference.batch(batch, "cpu")))
    np.testing.assert_allclose(result.cka_cross, direct.compute().numpy(), atol=1e-6)
    assert result.rollout_images.shape == (3, 3, size, size)
    assert result.rollout_maps.shape[0] == 3 and result.rollout_maps.min() >= 0 and result.rollout_maps.max() == 1
