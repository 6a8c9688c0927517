"""Masked patch prediction, the ViT paper's self-supervision (Dosovitskiy et al. 2021, §4.6, App. B.1.2).

Half of each image's patch embeddings are corrupted: of those, 80 % are replaced by a learned
[mask] embedding, 10 % by another patch's embedding and 10 % are kept. From the encoder's output
at each corrupted position a linear head predicts the patch's mean colour, 3 bits per channel
(512 classes), with cross-entropy. The "other" patch comes from the same image, so a sample's
corruption does not depend on the rest of its batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from pretrain.objectives.patches import SampleDraws, encode, require_patch_vit
from pretrain.objectives.registry import register_objective

# Corruption kinds of a patch.
CLEAN, MASKED, RANDOMISED, KEPT = 0, 1, 2, 3


@dataclass(frozen=True)
class Corruption:
    kind: torch.Tensor  # (B, N) long: CLEAN, MASKED, RANDOMISED or KEPT
    source: torch.Tensor  # (B, N) long: the patch whose embedding a RANDOMISED patch receives

    @property
    def corrupted(self) -> torch.Tensor:
        return self.kind != CLEAN


def mean_colour_classes(pixels: torch.Tensor, patch: int, bits: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, N) class of each patch's mean colour, `bits` per channel (r, g, b major to minor)."""
    levels = 2**bits
    means = F.avg_pool2d(pixels.float(), patch).flatten(2)  # (B, 3, N)
    quantised = (means * levels).floor().clamp(0, levels - 1).long()
    return (quantised[:, 0] * levels + quantised[:, 1]) * levels + quantised[:, 2]


@register_objective("masked_patch_prediction")
class MaskedPatchPrediction(nn.Module):
    reads_pixels = True  # gets the data's pixel_mean/pixel_std from build_objective

    def __init__(self, backbone: nn.Module, *, corrupt_ratio: float = 0.5, mask_prob: float = 0.8,
                 random_prob: float = 0.1, colour_bits: int = 3, pixel_mean=(0.5, 0.5, 0.5),
                 pixel_std=(0.5, 0.5, 0.5), seed: int = 0):
        """`pixel_mean`/`pixel_std`: the data's normalisation (`data.mean`/`data.std`), undone for the colour targets."""
        super().__init__()
        require_patch_vit(backbone, "masked_patch_prediction")
        if not 0 < corrupt_ratio < 1 or mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise ValueError("need 0 < corrupt_ratio < 1, mask_prob and random_prob >= 0 with mask_prob + random_prob <= 1")
        self.backbone = backbone
        self.corrupt_ratio, self.mask_prob, self.random_prob, self.colour_bits = corrupt_ratio, mask_prob, random_prob, colour_bits
        self.patch = backbone.patch_embed.patch_size[0]
        self.mask_token = nn.Parameter(trunc_normal_(torch.zeros(1, 1, backbone.embed_dim), std=0.02))
        self.colour_head = nn.Linear(backbone.embed_dim, 2 ** (3 * colour_bits))
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self.draws = SampleDraws(seed)

    def corruption(self, images: torch.Tensor) -> Corruption:
        """Which patches are corrupted and how: exactly round(corrupt_ratio * N) per image."""
        num_patches = self.backbone.patch_embed.num_patches
        u = self.draws(images, (3, num_patches))  # order, kind, source
        num_corrupt = round(self.corrupt_ratio * num_patches)
        rank = u[:, 0].argsort(1).argsort(1)
        kind = torch.where(u[:, 1] < self.mask_prob, MASKED, torch.where(u[:, 1] < self.mask_prob + self.random_prob, RANDOMISED, KEPT))
        kind = torch.where(rank < num_corrupt, kind, CLEAN)
        # Another patch of the same image: an offset of 1..N-1 from its own position.
        offset = 1 + (u[:, 2] * (num_patches - 1)).long().clamp(max=num_patches - 2)
        source = (torch.arange(num_patches, device=images.device) + offset) % num_patches
        return Corruption(kind, source)

    def colour_targets(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.float() * self.pixel_std + self.pixel_mean).clamp(0, 1)
        return mean_colour_classes(pixels, self.patch, self.colour_bits)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        del targets  # self-supervised
        plan = self.corruption(images)
        tokens = self.backbone.patch_embed(images)  # (B, N, D)
        others = tokens.gather(1, plan.source[..., None].expand_as(tokens))
        kind = plan.kind[..., None]
        tokens = torch.where(kind == MASKED, self.mask_token.to(tokens.dtype), torch.where(kind == RANDOMISED, others, tokens))
        features = encode(self.backbone, self.backbone._pos_embed(tokens))[:, self.backbone.num_prefix_tokens:]
        logits = self.colour_head(features[plan.corrupted]).float()
        target = self.colour_targets(images)[plan.corrupted]
        loss = F.cross_entropy(logits, target)
        return loss, {"accuracy": (logits.argmax(-1) == target).float().mean()}
