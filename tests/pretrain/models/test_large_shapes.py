"""ViT-g/14, ViT-G/14 and the ViT-22B-shaped variant: built on the meta device (no memory), their
layouts as the papers give them, and the tiny twins that train on CPU."""
import json

import pytest
import timm
import torch
from timm.models.vision_transformer import Block, ParallelScalingBlock

from pretrain.models import MODELS, build_model, export_spec


def _meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(name, num_classes=1000, img_size=224)


def test_vit_22b_on_the_meta_device_has_the_papers_parameter_count_and_layout():
    model = _meta("vit_22b")
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 21.7e9) <= 0.01 * 21.7e9, count
    assert (model.embed_dim, len(model.blocks), model.patch_embed.patch_size) == (6144, 48, (14, 14))
    block = model.blocks[0]
    assert isinstance(block, ParallelScalingBlock) and block.num_heads == 48
    # attention and MLP read one LayerNorm through one fused projection: QKV (no bias) and the 24576-wide MLP
    assert block.in_proj.bias is None and block.in_split == [24576, 6144, 6144, 6144]
    assert block.mlp_bias is not None  # the paper drops the QKV and LayerNorm biases only
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.bias is None for m in norms)  # no LayerNorm bias anywhere
    assert block.q_norm.normalized_shape == block.k_norm.normalized_shape == (128,)
    assert export_spec("vit_22b")["timm_name"] is None  # rebuilt from the registry, not by timm name


@pytest.mark.parametrize("name, timm_name", [("vit_g14", "vit_giant_patch14_224"), ("vit_G14", "vit_gigantic_patch14_224")])
def test_giant_and_gigantic_are_timms_architectures(name, timm_name):
    spec = export_spec(name)
    assert spec["timm_name"] == timm_name
    json.dumps(spec)  # the sidecar of an export holds it
    with torch.device("meta"):
        ours, theirs = _meta(name), timm.create_model(timm_name, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert all(isinstance(b, Block) for b in ours.blocks)


def _mlp_ratio(model: torch.nn.Module) -> float:
    block = model.blocks[0]
    hidden = block.in_split[0] if isinstance(block, ParallelScalingBlock) else block.mlp.fc1.out_features
    return hidden / model.embed_dim


@pytest.mark.parametrize("name, big", [("vit_g14_demo", "vit_g14"), ("vit_G14_demo", "vit_G14"), ("vit_22b_demo", "vit_22b")])
def test_tiny_twins_share_the_block_layout_and_train(name, big):
    assert MODELS[name].tiny
    torch.manual_seed(0)
    model = build_model(name, num_classes=4)
    large = _meta(big)
    assert type(model.blocks[0]) is type(large.blocks[0])
    assert _mlp_ratio(model) == pytest.approx(_mlp_ratio(large), rel=0.02)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # it fits a fixed batch
