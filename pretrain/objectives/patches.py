"""What the masked-patch objectives share: per-sample seeded draws, patchify, and a timm
VisionTransformer's encoder run on a chosen set of tokens.

Masks are drawn per sample from a seed made of the objective's `seed`, a fingerprint of the
sample's pixels and a draw counter kept as a buffer in the objective's state dict: a sample gets
the same mask on any rank and at any position in its batch, and a resumed run (same data order,
counter restored by the checkpoint) draws exactly the masks the uninterrupted run drew.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer


def require_patch_vit(backbone: nn.Module, objective: str) -> None:
    """Masked-patch objectives rebuild timm's VisionTransformer forward around plain pixel patches."""
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(
            f"objective {objective!r} needs a timm VisionTransformer backbone (model.name vit_*), not "
            f"{type(backbone).__name__}: pos_embed='rel', gpsa_blocks and PerViT models are not supported"
        )
    if type(backbone.patch_embed) is not PatchEmbed:
        # A convolutional stem sees the masked pixels through its receptive field.
        raise TypeError(f"objective {objective!r} needs pixel patches; hybrid stems ({type(backbone.patch_embed).__name__}) leak masked pixels")
    if backbone.dynamic_img_size:
        raise ValueError(f"objective {objective!r} needs a fixed patch grid; drop model.kwargs.dynamic_img_size")
    if not isinstance(backbone.patch_drop, nn.Identity):
        raise ValueError(f"objective {objective!r} masks patches itself; set model.kwargs.patch_drop_rate=0")


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C), patches row-major, pixels ordered (row, col, channel) as in MAE."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, gh, gw = patches.shape[0], *grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def encode(backbone: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """timm's `forward_features` from after the position embedding on: norm_pre, blocks, norm."""
    x = backbone.norm_pre(tokens)
    x = checkpoint_seq(backbone.blocks, x) if backbone.grad_checkpointing else backbone.blocks(x)
    return backbone.norm(x)


@lru_cache(maxsize=8)
def _fingerprint_weights(length: int, device: torch.device) -> torch.Tensor:
    return torch.randint(1, 2**20, (length,), generator=torch.Generator().manual_seed(0)).to(device)


class SampleDraws(nn.Module):
    """Uniform draws in [0, 1) per sample, seeded by (seed, pixel fingerprint, draw counter).

    Training forwards advance the counter (a buffer, so checkpoints carry it); evaluation draws
    use counter 0 and leave it alone, so validation masks are the same at every step.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, images: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if self.training:
            self.count += 1
        # Pixels quantised to exact integers and summed with fixed integer weights: exact (no
        # float rounding order), so the fingerprint is the same on every device and run.
        quantised = (images.detach().float() * 256).round().to(torch.int64).flatten(1)
        keys = (quantised * _fingerprint_weights(quantised.shape[1], quantised.device)).sum(1)
        *keys, count = torch.cat([keys, self.count.reshape(1)]).tolist()
        draw = count if self.training else 0
        # torch has no batched per-sample generator: one small CPU generator per sample.
        out = torch.empty(len(keys), *shape)
        for i, key in enumerate(keys):
            state = np.random.SeedSequence([self.seed, draw, key % 2**64]).generate_state(1, np.uint64)[0]
            out[i] = torch.rand(shape, generator=torch.Generator().manual_seed(int(state)))
        return out.to(images.device)
