"""Mean attention distance on hand-built attention patterns whose answer is known."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from pretrain.analysis.attention_distance import MeanAttentionDistance, TokenLayout, attention_distance, token_layout
from pretrain.analysis.capture import capture_attention
from pretrain.models import build_model


def with_prefix(patch_probs: torch.Tensor, prefix: int, prefix_mass: float) -> torch.Tensor:
    """Embed (..., P, P) patch attention into (..., prefix+P, prefix+P), each row giving
    `prefix_mass` to the first prefix token: mass the distance must ignore."""
    *lead, p, _ = patch_probs.shape
    full = torch.zeros(*lead, prefix + p, prefix + p, dtype=patch_probs.dtype)
    full[..., :, 0] = prefix_mass
    full[..., prefix:, prefix:] = (1 - prefix_mass) * patch_probs
    full[..., :prefix, :] = 1.0 / (prefix + p)
    return full


def mean_pairwise_distance(grid: tuple[int, int], patch_px: tuple[float, float]) -> float:
    """Uniform attention's answer, by brute force over every (query, key) pair of patches."""
    cells = list(itertools.product(range(grid[0]), range(grid[1])))
    total = sum(math.hypot((r1 - r2) * patch_px[0], (c1 - c2) * patch_px[1]) for (r1, c1), (r2, c2) in itertools.product(cells, cells))
    return total / len(cells) ** 2


def test_token_layout_finds_prefix_and_grid():
    assert token_layout(50, grid=(7, 7), num_prefix=1) == TokenLayout(1, (7, 7))
    assert token_layout(49, grid=(7, 7), num_prefix=1) == TokenLayout(0, (7, 7))  # ConViT's GPSA layers
    assert token_layout(14, grid=(3, 4), num_prefix=2) == TokenLayout(2, (3, 4))
    assert token_layout(65, num_prefix=1) == TokenLayout(1, (8, 8))  # no grid known: square
    with pytest.raises(ValueError, match="cannot place 47 tokens"):
        token_layout(47, grid=(7, 7), num_prefix=1)


def test_attending_to_self_is_distance_zero():
    grid = (3, 4)
    probs = with_prefix(torch.eye(12).expand(2, 3, 12, 12), prefix=1, prefix_mass=0.6)
    torch.testing.assert_close(attention_distance(probs, TokenLayout(1, grid), (4.0, 5.0)), torch.zeros(2, 3, dtype=torch.float64))


def test_uniform_attention_is_the_mean_pairwise_distance():
    grid, patch_px = (3, 4), (4.0, 5.0)
    probs = with_prefix(torch.full((1, 2, 12, 12), 1 / 12), prefix=2, prefix_mass=0.3)
    got = attention_distance(probs, TokenLayout(2, grid), patch_px)
    expected = mean_pairwise_distance(grid, patch_px)
    torch.testing.assert_close(got, torch.full((1, 2), expected, dtype=torch.float64))


def test_attending_to_the_right_neighbour():
    """Queries with a right neighbour look one patch width away; the last column looks at itself."""
    rows, cols = 3, 4
    probs = torch.zeros(1, 1, rows * cols, rows * cols)
    for r, c in itertools.product(range(rows), range(cols)):
        q = r * cols + c
        probs[0, 0, q, q + 1 if c + 1 < cols else q] = 1.0
    got = attention_distance(probs, TokenLayout(0, (rows, cols)), (4.0, 5.0))
    assert float(got) == pytest.approx(5.0 * 9 / 12)


def test_accumulator_averages_over_images_per_head():
    """Pixel size comes from the image size; averages weight every image equally."""
    dist = MeanAttentionDistance((12, 20), grid=(3, 4), num_prefix=1)
    uniform = torch.full((12, 12), 1 / 12)
    heads = lambda a, b: with_prefix(torch.stack([a, b]), prefix=1, prefix_mass=0.2)  # noqa: E731
    dist.update(0, torch.stack([heads(torch.eye(12), uniform)] * 3))  # 3 images
    dist.update(0, heads(uniform, uniform)[None])  # 1 image
    dist.update(1, heads(uniform, torch.eye(12))[None])
    far = mean_pairwise_distance((3, 4), (4.0, 5.0))
    (layer0, layer1) = dist.compute()
    assert layer0 == pytest.approx([far / 4, far])
    assert layer1 == pytest.approx([far, 0.0])


def test_captured_uniform_attention_of_a_real_model():
    """Zero query/key weights make every head of vit_demo attend uniformly to all 50 tokens:
    the distance over the 7x7 grid of 4 px patches is the uniform answer, through the hooks."""
    model = build_model("vit_demo", num_classes=10).eval()
    for block in model.blocks:
        block.attn.qkv.weight.data[: 2 * 96] = 0
        block.attn.qkv.bias.data[: 2 * 96] = 0
    probs = capture_attention(model, torch.randn(3, 3, 28, 28))
    assert len(probs) == 4 and all(p.shape == (3, 3, 50, 50) for p in probs)
    torch.testing.assert_close(probs[2], torch.full((3, 3, 50, 50), 1 / 50))
    dist = MeanAttentionDistance((28, 28), grid=(7, 7), num_prefix=1)
    for i, p in enumerate(probs):
        dist.update(i, p)
    expected = mean_pairwise_distance((7, 7), (4.0, 4.0))
    assert dist.compute() == [pytest.approx([expected] * 3)] * 4
