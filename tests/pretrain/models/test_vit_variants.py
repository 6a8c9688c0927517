"""The ViT paper's options and ConViT's GPSA: the properties each one claims, not just shapes."""
import math

import pytest
import torch

from pretrain.models import build_model


def _grid_distances(side: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cells = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    return torch.cdist(cells, cells)


def _mean_distance(attn: torch.Tensor, dist: torch.Tensor) -> float:
    """Attention-weighted query-key distance over patch tokens, prefix tokens dropped and renormalised."""
    attn = attn.mean(0)[:, -dist.shape[0]:, -dist.shape[0]:]
    attn = attn / attn.sum(-1, keepdim=True)
    return (attn * dist).sum(-1).mean().item()


def _shuffle_patches(images: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    B, C, H, W = images.shape
    g = H // patch
    tiles = images.reshape(B, C, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C, patch, patch)
    tiles = tiles[:, perm]
    return tiles.reshape(B, g, g, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


@pytest.mark.parametrize("pos_embed, invariant", [("none", True), ("learn", False), ("2d", False), ("rel", False)])
def test_only_models_without_position_information_ignore_patch_order(pos_embed, invariant):
    torch.manual_seed(0)
    model = build_model("vit_demo", num_classes=5, pos_embed=pos_embed).eval()
    with torch.no_grad():  # position tables at a trained scale, not their 0.02-std init
        for name, param in model.named_parameters():
            if "pos" in name:
                param.normal_()
    images = torch.randn(2, 3, 28, 28)
    shuffled = _shuffle_patches(images, 4, torch.randperm(49))
    with torch.no_grad():
        same = torch.allclose(model(images), model(shuffled), atol=1e-5)
    assert same == invariant


def test_2d_position_embedding_is_x_and_y_halves():
    model = build_model("vit_demo", num_classes=5, pos_embed="2d")
    assert model.pos_embed is None and model.pos_embed_h.shape == model.pos_embed_w.shape == (1, 7, 48)
    with torch.no_grad():
        added = model._pos_embed(torch.zeros(1, 49, 96))[:, 1:].reshape(7, 7, 96)  # class token first
    assert torch.equal(added[2, 5, :48], model.pos_embed_h[0, 2]) and torch.equal(added[2, 5, 48:], model.pos_embed_w[0, 5])
    assert torch.equal(added[2, :, :48], model.pos_embed_h[0, 2].expand(7, -1))  # one row shares its y half


def test_gap_classifier_has_no_class_token_and_averages_patches():
    model = build_model("vit_demo", num_classes=5, class_token=False).eval()
    assert model.cls_token is None and model.num_prefix_tokens == 0 and model.global_pool == "avg"
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 28, 28))
        assert tokens.shape[1] == 49
        torch.testing.assert_close(model.forward_head(tokens), model.head(model.fc_norm(tokens.mean(1))))


def test_pretraining_head_is_tanh_pre_logits_and_finetuning_drops_it():
    model = build_model("vit_demo", num_classes=5, pre_logits_size=32)
    tokens = model.forward_features(torch.randn(2, 3, 28, 28))
    features = model.forward_head(tokens, pre_logits=True)
    assert features.shape == (2, 32) and features.abs().max() < 1
    torch.testing.assert_close(features, torch.tanh(model.pre_logits.fc(tokens[:, 0])))
    model.reset_classifier(3)  # ViT paper fine-tuning: both head layers replaced by one linear layer
    assert isinstance(model.pre_logits, torch.nn.Identity) and model.head.in_features == 96
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 3)


def test_relative_position_bias_depends_only_on_the_offset():
    model = build_model("vit_demo", num_classes=5, pos_embed="rel")
    assert getattr(model, "pos_embed", None) is None
    bias = model.blocks[0].attn.rel_pos.get_bias()[0, :, 1:, 1:]  # heads, 49, 49 without the class token
    idx = lambda y, x: 7 * y + x  # noqa: E731
    torch.testing.assert_close(bias[:, idx(1, 1), idx(2, 3)], bias[:, idx(4, 2), idx(5, 4)])
    assert not torch.allclose(bias[:, idx(1, 1), idx(2, 3)], bias[:, idx(1, 1), idx(3, 2)])


def test_gpsa_heads_start_as_a_3x3_convolution(capture_attention):
    """ConViT: at its local init each of 9 GPSA heads attends to its own offset of a 3x3 neighbourhood."""
    torch.manual_seed(0)
    model = build_model("vit_demo", num_classes=5, gpsa_blocks=2, num_heads=9, embed_dim=72)
    maps = capture_attention(model, torch.randn(2, 3, 28, 28))
    centre = 3 * 7 + 3
    for block in ("blocks.0.attn", "blocks.1.attn"):
        attn = maps[block].mean(0)[:, centre]  # heads, keys (GPSA sees patches only: no class token yet)
        assert attn.shape == (9, 49)
        peaks = {divmod(int(a.argmax()), 7) for a in attn}
        assert peaks == {(3 + dy, 3 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert maps["blocks.2.attn"].shape[-1] == 50  # the class token joins after the GPSA blocks


def test_gpsa_blocks_are_local_and_locality_strength_sharpens_them(capture_attention):
    # ConViT's local init places heads on a sqrt(heads) x sqrt(heads) kernel: 9 heads, 3x3.
    torch.manual_seed(0)
    images, dist = torch.randn(2, 3, 28, 28), _grid_distances(7)
    distances = {}
    for strength in (1.0, 4.0):
        model = build_model("vit_demo", num_classes=5, gpsa_blocks=2, locality_strength=strength, num_heads=9, embed_dim=72)
        maps = capture_attention(model, images)
        distances[strength] = [_mean_distance(maps[f"blocks.{i}.attn"], dist) for i in range(4)]
    uniform = dist.mean().item()
    assert max(distances[1.0][:2]) < 0.6 * uniform  # GPSA blocks local
    assert min(distances[1.0][2:]) > 0.95 * uniform  # plain blocks near uniform at init
    assert distances[4.0][0] < distances[1.0][0]


def test_attention_maps_exist_for_every_variant_and_rows_sum_to_one(tiny_case, capture_attention):
    name, options = tiny_case
    model = build_model(name, num_classes=5, **options).eval()
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        fused = model(images)
    maps = capture_attention(model, images)
    assert len(maps) == len(model.blocks)
    for attn in maps.values():
        assert attn.dim() == 4 and attn.shape[-1] == attn.shape[-2]
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    with torch.no_grad():
        torch.testing.assert_close(model(images), fused, rtol=1e-4, atol=1e-5)  # same model, explicit attention
    assert math.isfinite(float(fused.sum()))
