"""Attention rollout on hand-built attention whose flow of information is known."""
from __future__ import annotations

import pytest
import torch

from pretrain.analysis.rollout import attention_rollout


def cls_looks_at(patch: int, num_patches: int, heads: int = 2) -> torch.Tensor:
    """(1, heads, 1+P, 1+P): the class token attends to one patch, every patch to itself."""
    attn = torch.eye(1 + num_patches).repeat(1, heads, 1, 1)
    attn[:, :, 0] = 0
    attn[:, :, 0, 1 + patch] = 1
    return attn


def test_class_token_map_shows_the_patch_it_reads():
    maps = attention_rollout([cls_looks_at(5, 12)] * 3, grid=(3, 4), num_prefix=1)
    expected = torch.zeros(1, 3, 4)
    expected[0, 1, 1] = 1  # patch 5, row-major
    torch.testing.assert_close(maps, expected)


def test_information_flows_through_layers():
    """Layer 1: patch 7 reads itself and patch 2 half-and-half; layer 2: the class token reads
    patch 7. With the residual mixed in, the class row holds 3/8 of patch 7 and 1/8 of patch 2."""
    first = torch.eye(13)[None, None].clone()
    first[0, 0, 1 + 7, 1 + 7] = first[0, 0, 1 + 7, 1 + 2] = 0.5
    maps = attention_rollout([first, cls_looks_at(7, 12, heads=1)], grid=(3, 4), num_prefix=1)[0].flatten()
    expected = torch.zeros(12)
    expected[7], expected[2] = 1, 1 / 3  # scaled so the largest is 1
    torch.testing.assert_close(maps, expected)


def test_class_token_added_mid_network_and_models_without_one():
    """ConViT's layout: patch-only layers, then the class token joins at the front."""
    patches_only = torch.eye(12)[None, None]
    maps = attention_rollout([patches_only, cls_looks_at(3, 12)], grid=(3, 4), num_prefix=1)
    assert maps.flatten().argmax() == 3 and maps.sum() == 1
    # No class token at all: the map is each patch's share of the mean-pooled output.
    pooled = torch.eye(12)[None, None].clone()
    pooled[0, 0, :, 4] = 1  # every patch also reads patch 4
    maps = attention_rollout([pooled], grid=(3, 4), num_prefix=1)
    assert maps.flatten().argmax() == 4 and maps.flatten()[4] == 1


def test_rollout_rejects_shrinking_token_sets():
    with pytest.raises(ValueError, match="one token set"):
        attention_rollout([torch.eye(13)[None, None], torch.eye(12)[None, None]])
