"""PerViT (arXiv 2206.06801): the properties the paper states for its attention and its init."""
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.models import build_model
from pretrain.models.pervit import PerViT

SIDE = 7  # 112 px / 16


@pytest.fixture(scope="module")
def model():
    """The paper's depth (2, 2, 6, 2 blocks) at toy widths, so the init schedule is the paper's."""
    torch.manual_seed(0)
    return PerViT(num_classes=10, img_size=16 * SIDE, stem_dims=(8, 8, 8, 16), embed_dims=(16, 16, 16, 16), num_heads=2)


@pytest.fixture(scope="module")
def run(model, capture_attention):
    """One forward pass: attention maps, block 0's attention input, the final tokens."""
    images = torch.randn(2, 3, 16 * SIDE, 16 * SIDE)
    seen = {}
    hooks = [model.blocks[0].norm1.register_forward_hook(lambda _m, _i, out: seen.__setitem__("attn_input", out)),
             model.norm.register_forward_hook(lambda _m, _i, out: seen.__setitem__("tokens", out))]
    seen["maps"] = capture_attention(model, images)
    for hook in hooks:
        hook.remove()
    return seen


def _grid_distances() -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    cells = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    return torch.cdist(cells, cells)


def test_peripheral_init_is_local_early_and_uniform_late(model, run):
    dist, n = _grid_distances(), SIDE * SIDE
    per_block = [run["maps"][f"blocks.{i}.attn"].mean(0) for i in range(len(model.blocks))]
    distance = [(a * dist).sum(-1).mean().item() for a in per_block]
    entropy = [(-(a * a.clamp_min(1e-12).log()).sum(-1)).mean().item() / math.log(n) for a in per_block]
    uniform = dist.mean().item()
    assert all(later > earlier for earlier, later in zip(distance, distance[1:])), distance  # grows with depth
    assert distance[0] < 0.5 * uniform and entropy[0] < 0.8  # first block: a neighbourhood
    assert abs(distance[-1] - uniform) < 0.01 * uniform and entropy[-1] > 0.99  # last block: everywhere


def test_attention_is_content_times_distance_based_position_renormalised(model, run):
    block = model.blocks[0]
    with torch.no_grad():
        position = block.attn.position(model.position_embeddings((SIDE, SIDE), torch.empty(0)))  # no image involved
        q, k, _ = block.attn.qkv(run["attn_input"]).reshape(2, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        content = (q @ k.transpose(-2, -1) * block.attn.scale).softmax(-1)
    torch.testing.assert_close(run["maps"]["blocks.0.attn"], F.normalize(content * position, p=1, dim=-1))


def test_position_attention_is_a_function_of_query_key_distance(model):
    with torch.no_grad():
        position = model.blocks[0].attn.position(model.position_embeddings((SIDE, SIDE), torch.empty(0)))
    centre = position[:, SIDE * SIDE // 2].reshape(-1, SIDE, SIDE)  # centre query of an odd grid
    for turned in (centre.rot90(1, (1, 2)), centre.transpose(1, 2), centre.flip(2)):
        torch.testing.assert_close(turned, centre)
    assert centre[:, 3, 4].min() > centre[:, 3, 6].max()  # nearer keys weigh more at init


def test_conv_patch_embedding_depthwise_position_encoding_and_gap_head(model, run):
    convs = [layer.conv for layer in model.patch_embed.stem]
    assert [(c.kernel_size, c.stride) for c in convs] == [((3, 3), (2, 2))] * 4
    assert all(isinstance(layer.bn, torch.nn.BatchNorm2d) for layer in model.patch_embed.stem)
    assert model.patch_embed.proj.kernel_size == (1, 1) and model.patch_embed.grid_size == (SIDE, SIDE)
    for block in model.blocks:
        dim = block.norm1.normalized_shape[0]
        assert block.pos_conv.groups == dim and block.pos_conv.kernel_size == (3, 3)
    tokens = run["tokens"]
    assert tokens.shape == (2, SIDE * SIDE, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(tokens), model.head(tokens.mean(1)))


def test_any_resolution_runs_with_the_same_weights():
    small = build_model("pervit_demo", num_classes=3)
    large = build_model("pervit_demo", num_classes=3, img_size=96)
    large.load_state_dict(small.state_dict(), strict=True)  # no position tables to resample
    assert large(torch.randn(1, 3, 96, 96)).shape == (1, 3)
