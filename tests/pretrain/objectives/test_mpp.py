"""The ViT paper's masked patch prediction: corruption proportions, what the encoder receives, colour targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.models import build_model
from pretrain.objectives import build_objective
from pretrain.objectives.mpp import CLEAN, KEPT, MASKED, RANDOMISED

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def objective():
    torch.manual_seed(0)
    backbone = build_model("vit_demo", num_classes=10, img_size=32)  # 8x8 grid: 32 of 64 patches corrupted
    return build_objective("masked_patch_prediction", backbone, pixel_mean=MEAN, pixel_std=STD, seed=3)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_half_of_the_patches_are_corrupted_80_10_10(objective):
    x = normalised(torch.rand(512, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    plan = objective.corruption(x)
    assert (plan.corrupted.sum(1) == 32).all()  # exactly half of every image
    kinds = plan.kind[plan.corrupted]
    fractions = [(kinds == k).float().mean().item() for k in (MASKED, RANDOMISED, KEPT)]
    # 16384 corrupted patches: 3 sigma is under 0.01 for each share.
    assert fractions == pytest.approx([0.8, 0.1, 0.1], abs=0.015)
    offsets = (plan.source - torch.arange(64)) % 64
    assert offsets.min() >= 1 and len(offsets[plan.kind == RANDOMISED].unique()) == 63  # any other patch, never itself


def test_the_encoder_receives_mask_other_and_own_embeddings(objective):
    x = normalised(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    backbone = objective.backbone
    seen = {}
    hook = backbone.norm_pre.register_forward_pre_hook(lambda _, args: seen.setdefault("tokens", args[0]))
    objective.eval()
    try:
        with torch.no_grad():
            objective(x, torch.full((8,), -1))
            plan = objective.corruption(x)  # eval draws: the same plan the forward used
            own = backbone.patch_embed(x)
    finally:
        hook.remove()
        objective.train()
    tokens = seen["tokens"][:, 1:] - backbone.pos_embed[:, 1:]  # the class token comes first
    expected = torch.where((plan.kind == MASKED)[..., None], objective.mask_token,
                           torch.where((plan.kind == RANDOMISED)[..., None], own.gather(1, plan.source[..., None].expand_as(own)), own))
    torch.testing.assert_close(tokens, expected)
    assert set(plan.kind.unique().tolist()) == {CLEAN, MASKED, RANDOMISED, KEPT}


def test_targets_are_the_3_bit_mean_colours_of_the_patches(objective):
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    pixels[0, :, :4, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # patch 0: pure red
    pixels[0, :, :4, 4:8] = 1.0  # patch 1: white
    pixels[0, :, :4, 8:12] = 0.0  # patch 2: black
    targets = objective.colour_targets(normalised(pixels))
    assert targets[0, :3].tolist() == [7 * 64, 511, 0]
    array = pixels.numpy()
    for b in range(4):
        for row in range(8):
            for col in range(8):
                mean = array[b, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4].mean(axis=(1, 2))
                r, g, bl = np.minimum(np.floor(mean * 8), 7).astype(int)
                assert targets[b, 8 * row + col].item() == 64 * r + 8 * g + bl, (b, row, col)


def test_loss_is_cross_entropy_over_512_colours_and_trains(objective):
    x = normalised(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    loss, metrics = objective(x, torch.full((16,), -1))
    assert loss.item() == pytest.approx(np.log(512), rel=0.1)  # near chance at initialisation
    loss.backward()
    assert objective.mask_token.grad.abs().sum() > 0 and objective.colour_head.weight.grad.abs().sum() > 0
    assert 0 <= metrics["accuracy"].item() <= 1
    objective.zero_grad()


@pytest.mark.parametrize("model", ["pervit_demo", "r_vit_demo"])
def test_backbones_without_pixel_patches_are_refused(model):
    with pytest.raises(TypeError, match="masked_patch_prediction"):
        build_objective("masked_patch_prediction", build_model(model, num_classes=10))
