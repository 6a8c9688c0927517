"""Mean attention distance (ViT paper, Fig. 7): how far, in pixels, each head looks.

For a query patch, the distance is the attention-weighted mean of the pixel distances between
its centre and the key patches' centres; it is averaged over queries and images. Prefix
tokens (class, distillation, register tokens) have no position: they are dropped as queries
and as keys, and each query's remaining attention is renormalised, so a head that parks most
of its mass on the class token is not reported as local.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    num_prefix: int
    grid: tuple[int, int]  # patch rows, patch columns


def token_layout(num_tokens: int, *, grid: tuple[int, int] | None = None, num_prefix: int = 0) -> TokenLayout:
    """Split `num_tokens` into prefix tokens and a patch grid.

    `grid` and `num_prefix` are the model's own (patch_embed.grid_size, num_prefix_tokens);
    a layer may hold fewer prefix tokens (ConViT adds its class token after the GPSA
    layers), and models without a known grid are taken to have a square one.
    """
    for prefix in dict.fromkeys((num_prefix, 0)):
        patches = num_tokens - prefix
        if grid is not None and patches == grid[0] * grid[1]:
            return TokenLayout(prefix, tuple(grid))
        side = math.isqrt(max(patches, 0))
        if patches > 0 and side * side == patches:
            return TokenLayout(prefix, (side, side))
    raise ValueError(
        f"cannot place {num_tokens} tokens on a patch grid (model grid {grid}, {num_prefix} prefix tokens): "
        "attention distance needs patch tokens on a regular grid"
    )


def patch_distances(grid: tuple[int, int], patch_px: tuple[float, float]) -> torch.Tensor:
    """(P, P) pixel distances between patch centres, row-major patch order."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten() * patch_px[0], cols.flatten() * patch_px[1]], dim=1).double()
    return torch.cdist(centres, centres)


def attention_distance(probs: torch.Tensor, layout: TokenLayout, patch_px: tuple[float, float]) -> torch.Tensor:
    """(B, H) mean over queries of the attention-weighted pixel distance, for (B, H, N, N) probabilities."""
    p = layout.num_prefix
    weights = probs[..., p:, p:].double()
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    dist = patch_distances(layout.grid, patch_px).to(weights.device)
    return (weights * dist).sum(-1).mean(-1)


class MeanAttentionDistance:
    """Accumulates per-layer, per-head mean attention distance over batches of images."""

    def __init__(self, image_size: tuple[int, int], *, grid: tuple[int, int] | None = None, num_prefix: int = 0):
        self.image_size, self.grid, self.num_prefix = image_size, grid, num_prefix
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def update(self, layer: int, probs: torch.Tensor) -> None:
        layout = token_layout(probs.shape[-1], grid=self.grid, num_prefix=self.num_prefix)
        patch_px = (self.image_size[0] / layout.grid[0], self.image_size[1] / layout.grid[1])
        per_image = attention_distance(probs, layout, patch_px).sum(0).cpu()
        self.sums[layer] = self.sums.get(layer, 0) + per_image
        self.counts[layer] = self.counts.get(layer, 0) + probs.shape[0]

    def compute(self) -> list[list[float]]:
        """Per layer (in order), the mean distance in pixels of each head."""
        return [(self.sums[i] / self.counts[i]).tolist() for i in sorted(self.sums)]
