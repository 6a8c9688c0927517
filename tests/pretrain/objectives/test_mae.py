"""MAE: the encoder sees only the visible tokens, the loss counts only masked patches, reconstructions draw."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from pretrain.models import build_model, export_spec
from pretrain.objectives import build_objective

MEAN, STD = (0.3, 0.3, 0.3), (0.35, 0.35, 0.35)


@pytest.fixture(scope="module")
def objective():
    torch.manual_seed(0)
    backbone = build_model("vit_demo", num_classes=10)  # 7x7 grid: 12 of 49 patches visible
    return build_objective("mae", backbone, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                           pixel_mean=MEAN, pixel_std=STD)


def batch(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_the_encoder_sees_the_class_token_and_the_12_visible_patches_only(objective):
    x = batch()
    seen = {}
    hook = objective.backbone.norm_pre.register_forward_pre_hook(lambda _, args: seen.setdefault("tokens", args[0]))
    objective.eval()
    try:
        with torch.no_grad():
            objective(x, torch.full((6,), -1))
            masking = objective.random_masking(x)  # eval draws: the masks the forward used
            embedded = objective.backbone._pos_embed(objective.backbone.patch_embed(x))
    finally:
        hook.remove()
        objective.train()
    assert seen["tokens"].shape == (6, 1 + 12, 96)
    assert (masking.masked.sum(1) == 37).all()
    visible = torch.stack([embedded[b, 1:][~masking.masked[b]] for b in range(6)])
    torch.testing.assert_close(seen["tokens"][:, 1:].sort(1).values, visible.sort(1).values)
    torch.testing.assert_close(seen["tokens"][:, 0], embedded[:, 0])


def test_loss_counts_masked_patches_only(objective):
    x = batch()
    masking = objective.random_masking(x)
    pred = torch.randn(6, 49, 48, generator=torch.Generator().manual_seed(1))
    loss = objective.reconstruction_loss(pred, x, masking.masked)
    pixel_mask = masking.masked.view(6, 1, 7, 7).repeat_interleave(4, 2).repeat_interleave(4, 3).float()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    assert objective.reconstruction_loss(pred, x + noise * (1 - pixel_mask), masking.masked).item() == loss.item()
    assert objective.reconstruction_loss(pred, x + noise * pixel_mask, masking.masked).item() != pytest.approx(loss.item(), rel=1e-3)


def test_norm_pix_targets_ignore_each_patchs_brightness_and_contrast(objective):
    x = batch()
    masking = objective.random_masking(x)
    pred = torch.randn(6, 49, 48, generator=torch.Generator().manual_seed(3))
    per_patch_gain = 1 + torch.rand(6, 1, 7, 7, generator=torch.Generator().manual_seed(4))
    gain = per_patch_gain.repeat_interleave(4, 2).repeat_interleave(4, 3)
    loss = objective.reconstruction_loss(pred, x, masking.masked)
    assert objective.reconstruction_loss(pred, x * gain + 0.7, masking.masked).item() == pytest.approx(loss.item(), rel=1e-4)


def test_gradients_reach_the_encoder_through_visible_tokens_and_the_decoder(objective):
    loss, _ = objective(batch(), torch.full((6,), -1))
    loss.backward()
    grads = {n: p.grad for n, p in objective.named_parameters()}
    assert grads["backbone.head.weight"] is None  # the classifier is not part of MAE
    for name in ("backbone.patch_embed.proj.weight", "backbone.cls_token", "backbone.blocks.3.mlp.fc2.weight",
                 "mask_token", "decoder_pred.weight"):
        assert grads[name].abs().sum() > 0, name
    objective.zero_grad(set_to_none=True)


def test_backbone_weights_load_into_timm_without_the_decoder(objective):
    spec = export_spec("vit_demo", num_classes=10)
    model = timm.create_model(spec["timm_name"], pretrained=False, **spec["timm_kwargs"])
    model.load_state_dict(objective.backbone.state_dict(), strict=True)
    assert not any(k.startswith("backbone.") for k in model.state_dict())


def test_visualize_draws_original_masked_and_reconstruction_rows(objective):
    x = batch(3)
    count = objective.draws.count.item()
    grid = np.asarray(objective.visualize(x)).astype(np.float32) / 255
    assert objective.training and objective.draws.count.item() == count  # training state untouched
    tile, pad = 28 * 4, 2  # 28 px images drawn 4x larger
    assert grid.shape == (pad + 3 * (tile + pad), pad + 3 * (tile + pad), 3)
    masked = objective.eval().random_masking(x).masked.view(3, 7, 7)  # the evaluation masks visualize uses
    objective.train()
    pixels = (x * STD[0] + MEAN[0]).clamp(0, 1)
    for row in range(3):
        top = pad + row * (tile + pad)
        cells = [grid[top:top + tile, pad + c * (tile + pad):pad + c * (tile + pad) + tile, 0][::4, ::4] for c in range(3)]
        original, shown, recon = (torch.from_numpy(c.copy()) for c in cells)
        torch.testing.assert_close(original, pixels[row, 0], atol=1 / 255, rtol=0)
        visible = ~masked[row].repeat_interleave(4, 0).repeat_interleave(4, 1)
        torch.testing.assert_close(shown[visible], pixels[row, 0][visible], atol=1 / 255, rtol=0)
        torch.testing.assert_close(shown[~visible], torch.full_like(shown[~visible], 0.5), atol=1 / 255, rtol=0)
        torch.testing.assert_close(recon[visible], pixels[row, 0][visible], atol=1 / 255, rtol=0)


def test_a_mask_ratio_that_keeps_no_patch_is_refused():
    with pytest.raises(ValueError, match="mask_ratio"):
        build_objective("mae", build_model("vit_demo", num_classes=10), mask_ratio=0.99)


def test_flops_count_the_encoder_on_the_visible_tokens_only():
    from pretrain.models import flops_per_image
    from pretrain.engine.perf import train_flops_per_sample

    with torch.device("meta"):  # ViT-L/16 and the recipe's 8 x 512 decoder, no memory
        backbone = build_model("vit_l16", num_classes=1000)
        mae = build_objective("mae", backbone, mask_ratio=0.75)
        one_masked = build_objective("mae", backbone, mask_ratio=1 / 196)
    encoder_all_tokens = flops_per_image(backbone, 224)
    assert mae.flops_per_image(224) < 0.35 * encoder_all_tokens  # 50 of 197 tokens, plus the light decoder
    assert one_masked.flops_per_image(224) > encoder_all_tokens  # 196 tokens plus the decoder
    assert one_masked.flops_per_image(224) / mae.flops_per_image(224) == pytest.approx(3.2, abs=0.1)
    assert train_flops_per_sample(mae, 224) == 3 * mae.flops_per_image(224)  # what MFU uses
