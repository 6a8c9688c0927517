"""PerViT: Peripheral Vision Transformer (Min et al., arXiv 2206.06801).

No library has it, so it is written here from timm's parts (`Mlp`, `DropPath`, `ConvNormAct`).
Its pieces, as the paper describes them:

- Multi-head peripheral attention: each head's content attention softmax(QK^T/sqrt(d)) is
  multiplied elementwise by a position-based attention and renormalised per query (L1).
- The position-based attention is computed from the Euclidean distance between every query and
  key position, embedded by a linear layer shared by all blocks, then per block by an MLP whose
  layers are *peripheral projections*: small (3x3) convolutions over each query's distance map,
  each followed by instance norm (ReLU between them, sigmoid at the end). The key grid is padded
  by one cell per 3x3 projection so the projections see real distances beyond the border.
- Peripheral initialisation: the last instance norm's affine (gain, bias) runs from (3, -5) in
  the first block to (0.01, 4) in the last, so at initialisation early blocks attend to a small
  neighbourhood and late blocks almost uniformly (the position term is a constant sigmoid(4)).
- A convolutional patch embedding: four 3x3 stride-2 convolutions with BN+ReLU, then a 1x1
  convolution (16x downsampling); a 3x3 depthwise convolution as position encoding in front of
  each block's first LayerNorm; four stages of widths `embed_dims` (a linear shortcut where the
  width changes); a global-average-pooled head.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, DropPath, LayerNorm, Mlp, trunc_normal_
from timm.models import checkpoint

# Peripheral initialisation of the last instance norm's affine, first block -> last block (paper, Sec. 3.3).
LOCALITY_GAIN = (3.0, 0.01)
LOCALITY_BIAS = (-5.0, 4.0)
# Channels of the distance embedding per head (D_r = 4 * heads in the paper's models).
DISTANCE_CHANNELS_PER_HEAD = 4


class ConvPatchEmbed(nn.Module):
    """Four 3x3 stride-2 conv+BN+ReLU, then a 1x1 conv: (B, 3, H, W) -> (B, C, H/16, W/16)."""

    def __init__(self, img_size: int | tuple[int, int], in_chans: int, dims: tuple[int, ...]):
        super().__init__()
        chans = (in_chans, *dims)
        self.stem = nn.Sequential(*[ConvNormAct(chans[i], chans[i + 1], 3, stride=2) for i in range(len(dims))])
        self.proj = nn.Conv2d(dims[-1], dims[-1], 1)
        self.reduction = 2 ** len(dims)
        self.set_input_size(img_size)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.grid_size = tuple(math.ceil(s / self.reduction) for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x))


def query_key_distances(grid: tuple[int, int], pad: int, device: torch.device | None = None) -> torch.Tensor:
    """(Hq*Wq, Hq+2*pad, Wq+2*pad): distance from each query cell to each cell of the padded key grid.

    Positions are on the paper's normalised grid (the longer side spans [-1, 1]), so distances are
    relative to the image: a 3x3 neighbourhood shrinks as the resolution grows.
    """
    step = 2.0 / max(max(grid) - 1, 1)
    ys = (torch.arange(grid[0], device=device) - (grid[0] - 1) / 2) * step
    xs = (torch.arange(grid[1], device=device) - (grid[1] - 1) / 2) * step
    ky = (torch.arange(-pad, grid[0] + pad, device=device) - (grid[0] - 1) / 2) * step
    kx = (torch.arange(-pad, grid[1] + pad, device=device) - (grid[1] - 1) / 2) * step
    dy = ky.view(1, 1, -1, 1) - ys.view(-1, 1, 1, 1)
    dx = kx.view(1, 1, 1, -1) - xs.view(1, -1, 1, 1)
    return (dy**2 + dx**2).sqrt().flatten(0, 1)


class PeripheralPosition(nn.Module):
    """Position-based attention of one block: distance embeddings -> (heads, Nq, Nk) in (0, 1)."""

    def __init__(self, channels: int, num_heads: int, *, gain: float, bias: float, kernel_size: int = 3):
        super().__init__()
        # Valid (unpadded) convolutions: the key grid arrives padded by kernel_size // 2 per projection.
        self.proj1 = nn.Conv2d(channels, channels, kernel_size)
        self.norm1 = nn.GroupNorm(channels, channels)  # one group per channel: instance norm per query map
        self.act = nn.ReLU()
        self.proj2 = nn.Conv2d(channels, num_heads, kernel_size)
        self.norm2 = nn.GroupNorm(num_heads, num_heads)
        self.pad = 2 * (kernel_size // 2)
        for conv in (self.proj1, self.proj2):
            # The paper's constant init: every projection starts as a smoothing of the distance map.
            nn.init.constant_(conv.weight, 0.02)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.norm2.weight, gain)
        nn.init.constant_(self.norm2.bias, bias)

    def forward(self, distance_embed: torch.Tensor) -> torch.Tensor:
        nq = distance_embed.shape[0]
        x = self.act(self.norm1(self.proj1(distance_embed)))
        x = torch.sigmoid(self.norm2(self.proj2(x)))  # (Nq, heads, Hk, Wk)
        return x.reshape(nq, x.shape[1], -1).transpose(0, 1)


class PeripheralAttention(nn.Module):
    """Multi-head peripheral attention; the final probabilities pass through `attn_drop`."""

    def __init__(self, dim: int, num_heads: int, position: PeripheralPosition, *, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PerViT width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.position = position
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, distance_embed: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        content = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        attn = F.normalize(content * self.position(distance_embed), p=1, dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class PerViTBlock(nn.Module):
    def __init__(self, dim: int, out_dim: int, num_heads: int, position: PeripheralPosition, *, mlp_ratio: float,
                 qkv_bias: bool, drop_path: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.pos_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = PeripheralAttention(dim, num_heads, position, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), out_features=out_dim, drop=proj_drop)
        self.shortcut = nn.Linear(dim, out_dim) if out_dim != dim else nn.Identity()

    def forward(self, x: torch.Tensor, distance_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        # The depthwise conv encodes position for the attention input only; the residual keeps x.
        pos = self.pos_conv(x.transpose(1, 2).reshape(B, C, *grid)).flatten(2).transpose(1, 2)
        x = x + self.drop_path(self.attn(self.norm1(pos), distance_embed))
        return self.shortcut(x) + self.drop_path(self.mlp(self.norm2(x)))


class PerViT(nn.Module):
    """timm-style interface: forward_features -> (B, N, C) tokens, forward_head(x, pre_logits)."""

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        stem_dims: tuple[int, ...] = (48, 64, 96, 128),
        embed_dims: tuple[int, ...] = (128, 192, 224, 280),
        stage_depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        locality_gain: tuple[float, float] = LOCALITY_GAIN,
        locality_bias: tuple[float, float] = LOCALITY_BIAS,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if len(embed_dims) != len(stage_depths) or stem_dims[-1] != embed_dims[0]:
            raise ValueError(
                f"PerViT needs one width per stage and a stem ending at the first width; got stem_dims={stem_dims}, "
                f"embed_dims={embed_dims}, stage_depths={stage_depths}"
            )
        widths = [d for d, n in zip(embed_dims, stage_depths) for _ in range(n)]
        depth = len(widths)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = widths[-1]
        self.num_prefix_tokens = 0
        self.global_pool = "avg"
        self.grad_checkpointing = False

        self.patch_embed = ConvPatchEmbed(img_size, in_chans, tuple(stem_dims))
        channels = DISTANCE_CHANNELS_PER_HEAD * num_heads
        self.distance_embed = nn.Linear(1, channels)  # shared by every block
        # Peripheral init: nearer keys get larger embeddings.
        nn.init.constant_(self.distance_embed.weight, -0.02)
        nn.init.zeros_(self.distance_embed.bias)
        gains = torch.linspace(*locality_gain, depth, device="cpu").tolist()
        biases = torch.linspace(*locality_bias, depth, device="cpu").tolist()
        drop_paths = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            PerViTBlock(
                widths[i], widths[i + 1] if i + 1 < depth else widths[i], num_heads,
                PeripheralPosition(channels, num_heads, gain=gains[i], bias=biases[i]),
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_paths[i], attn_drop=attn_drop_rate,
                proj_drop=proj_drop_rate,
            )
            for i in range(depth)
        )
        self.position_pad = self.blocks[0].attn.position.pad
        self.norm = LayerNorm(self.num_features, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and name != "distance_embed":
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Nothing to resample: the position term is a function of distances, recomputed per grid."""
        self.patch_embed.set_input_size(img_size)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"PerViT pools by global average only, not {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def position_embeddings(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """Distance embeddings (Nq, channels, Hk+pad, Wk+pad) shared by the blocks' position MLPs."""
        dist = query_key_distances(grid, self.position_pad, like.device).to(like.dtype)
        return self.distance_embed(dist.unsqueeze(-1)).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        distance_embed = self.position_embeddings(grid, x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, distance_embed, grid)
            else:
                x = block(x, distance_embed, grid)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


PERVIT_SIZES: dict[str, dict] = {
    # The paper's PerViT-T/S/M: widths per stage, stem widths, heads.
    "t": dict(embed_dims=(128, 192, 224, 280), stem_dims=(48, 64, 96, 128), num_heads=4),
    "s": dict(embed_dims=(272, 320, 368, 464), stem_dims=(64, 128, 192, 272), num_heads=8),
    "m": dict(embed_dims=(312, 468, 540, 684), stem_dims=(64, 192, 256, 312), num_heads=12),
}
