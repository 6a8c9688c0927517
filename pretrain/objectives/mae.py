"""Masked autoencoder (He et al. 2022): the encoder sees only the visible patches.

75 % of each image's patches are masked at random; the backbone (a timm VisionTransformer, its
own patch embedding, position embedding and blocks) encodes the rest; a light decoder of timm
`Block`s gets the encoded tokens plus a learned mask token at every masked position, with fixed
2-D sin-cos position embeddings, and predicts the pixels of each patch. The loss is the mean
squared error over masked patches only, against per-patch normalised pixels (`norm_pix_loss`).
Exports keep the backbone; the decoder is dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from pretrain.models.flops import flops_per_image
from pretrain.objectives.patches import SampleDraws, encode, patchify, require_patch_vit, unpatchify
from pretrain.objectives.registry import register_objective

NORM_PIX_EPS = 1e-6  # MAE's


@dataclass(frozen=True)
class Masking:
    keep: torch.Tensor  # (B, K) indices of the visible patches, in draw order
    restore: torch.Tensor  # (B, N) where each patch sits in [visible..., masked...]
    masked: torch.Tensor  # (B, N) bool


@register_objective("mae")
class MaskedAutoencoder(nn.Module):
    reads_pixels = True  # gets the data's pixel_mean/pixel_std from build_objective

    def __init__(self, backbone: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True,
                 pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5), seed: int = 0):
        """`pixel_mean`/`pixel_std` (the data's normalisation) are used only to draw reconstructions."""
        super().__init__()
        require_patch_vit(backbone, "mae")
        num_patches = backbone.patch_embed.num_patches
        if not 0 < mask_ratio < 1 or round(num_patches * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio={mask_ratio} must keep at least one of {num_patches} patches and mask some")
        self.backbone = backbone
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch = backbone.patch_embed.patch_size[0]
        self.grid = tuple(backbone.patch_embed.grid_size)
        self.draws = SampleDraws(seed)

        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Prefix tokens (class token) get a zero position, as in MAE.
        pos = build_sincos2d_pos_embed(list(self.grid), decoder_dim)
        pos = F.pad(pos, (0, 0, backbone.num_prefix_tokens, 0))
        self.register_buffer("decoder_pos_embed", pos[None], persistent=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer) for _ in range(decoder_depth)
        ])
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch**2 * 3)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's initialisation: xavier-uniform linear layers, N(0, 0.02) mask token. Through
        `Module.apply`, inside which ZeRO-3's zero.Init gathers the partitioned layers."""
        nn.init.normal_(self.mask_token, std=0.02)
        backbone = {id(m) for m in self.backbone.modules()}

        def init(module: nn.Module) -> None:
            if id(module) not in backbone and isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(init)

    @property
    def num_visible(self) -> int:
        return round(self.backbone.patch_embed.num_patches * (1 - self.mask_ratio))

    def random_masking(self, images: torch.Tensor) -> Masking:
        num_patches = self.backbone.patch_embed.num_patches
        order = self.draws(images, (num_patches,)).argsort(1)  # ascending noise: first ones stay visible
        restore = order.argsort(1)
        return Masking(keep=order[:, : self.num_visible], restore=restore, masked=restore >= self.num_visible)

    def forward_encoder(self, images: torch.Tensor, masking: Masking) -> torch.Tensor:
        """(B, prefix + K, D): the backbone over its prefix tokens and the visible patches only."""
        tokens = self.backbone._pos_embed(self.backbone.patch_embed(images))
        prefix = self.backbone.num_prefix_tokens
        visible = tokens[:, prefix:].gather(1, masking.keep[..., None].expand(-1, -1, tokens.shape[-1]))
        return encode(self.backbone, torch.cat([tokens[:, :prefix], visible], dim=1))

    def forward_decoder(self, latent: torch.Tensor, masking: Masking) -> torch.Tensor:
        """(B, N, patch*patch*3) pixel predictions for every patch."""
        x = self.decoder_embed(latent)
        prefix = self.backbone.num_prefix_tokens
        b, n = masking.restore.shape
        patches = torch.cat([x[:, prefix:], self.mask_token.to(x.dtype).expand(b, n - self.num_visible, -1)], dim=1)
        patches = patches.gather(1, masking.restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, prefix:])

    def pixel_targets(self, images: torch.Tensor) -> torch.Tensor:
        target = patchify(images.float(), self.patch)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt()
        return target

    def reconstruction_loss(self, pred: torch.Tensor, images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        per_patch = (pred.float() - self.pixel_targets(images)).pow(2).mean(-1)
        masked = masked.float()
        return (per_patch * masked).sum() / masked.sum()

    def flops_per_image(self, image_size: int) -> int:
        """Forward FLOPs of one image (for MFU): the encoder on the visible tokens only, the decoder on all."""
        if (image_size, image_size) != tuple(self.backbone.patch_embed.img_size):
            raise ValueError(f"MAE counts FLOPs at its patch grid's {self.backbone.patch_embed.img_size} px, not {image_size}")
        return flops_per_image(_FixedMaskForward(self), image_size)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        del targets  # self-supervised
        masking = self.random_masking(images)
        pred = self.forward_decoder(self.forward_encoder(images, masking), masking)
        return self.reconstruction_loss(pred, images, masking.masked), {}

    @torch.no_grad()
    def visualize(self, images: torch.Tensor, min_tile: int = 96) -> Image.Image:
        """A PNG-ready grid, one row per image: original, masked input, reconstruction (visible patches pasted back).

        Drawn in eval mode with the evaluation masks, so the training draws and RNG are untouched.
        """
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters())
            images = images.to(param.device, param.dtype)
            masking = self.random_masking(images)
            pred = self.forward_decoder(self.forward_encoder(images, masking), masking).float()
        finally:
            self.train(was_training)
        original = patchify(images.float(), self.patch)
        if self.norm_pix_loss:  # predictions are per-patch normalised: use the true patch statistics
            pred = pred * (original.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt() + original.mean(-1, keepdim=True)
        masked = masking.masked[..., None]
        grey = ((0.5 - self.pixel_mean) / self.pixel_std).float()  # mid-grey in normalised units
        grey = patchify(grey.expand(1, 3, self.patch * self.grid[0], self.patch * self.grid[1]), self.patch)
        columns = [original, torch.where(masked, grey, original), torch.where(masked, pred, original)]
        tiles = torch.stack([unpatchify(c, self.patch, self.grid) for c in columns], dim=1).flatten(0, 1)
        tiles = (tiles * self.pixel_std.float() + self.pixel_mean.float()).clamp(0, 1)
        scale = math.ceil(min_tile / tiles.shape[-1])
        if scale > 1:  # small images (28 px) stay readable
            tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
        return to_pil_image(make_grid(tiles.cpu(), nrow=len(columns), padding=2, pad_value=1.0))


class _FixedMaskForward(nn.Module):
    """MAE's encoder and decoder under a fixed mask: FLOPs are counted on the meta device,
    where the per-sample draws (which read pixel values) cannot run."""

    def __init__(self, mae: MaskedAutoencoder):
        super().__init__()
        self.mae = mae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        num_patches, visible = self.mae.backbone.patch_embed.num_patches, self.mae.num_visible
        order = torch.arange(num_patches, device=images.device).expand(images.shape[0], -1)
        masking = Masking(keep=order[:, :visible], restore=order, masked=order >= visible)
        return self.mae.forward_decoder(self.mae.forward_encoder(images, masking), masking)
