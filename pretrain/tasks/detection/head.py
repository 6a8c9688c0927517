"""DETR's decoder head: learned object queries cross-attend to the backbone's feature map."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import Mlp
from torchvision.ops import MLP


def sine_position_encoding(height: int, width: int, dim: int, *, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's 2-D sine encoding of a (height, width) grid, normalised to [0, 2*pi]: (H*W, dim).

    Half the channels encode y, half x, each as interleaved sin/cos of geometric frequencies.
    """
    if dim % 4:
        raise ValueError(f"sine position encoding needs a dim divisible by 4, got {dim}")
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32) / (height + eps) * scale
    x = torch.arange(1, width + 1, dtype=torch.float32) / (width + eps) * scale
    feats = dim // 2
    freq = temperature ** (2 * (torch.arange(feats) // 2) / feats)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] / freq
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, feats)
    pos_x = encode(x)[None, :, :].expand(height, width, feats)
    return torch.cat((pos_y, pos_x), dim=-1).reshape(height * width, dim)


class DecoderLayer(nn.Module):
    """Post-norm decoder layer as in DETR. Hand-written because DETR adds the query and memory
    positions to the attention queries and keys only, which nn.TransformerDecoderLayer cannot."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.mlp = Mlp(d_model, dim_feedforward, drop=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, *, query_pos: torch.Tensor, memory_pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, memory + memory_pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.drop(attended))
        return self.norm3(tgt + self.drop(self.mlp(tgt)))


class DETRHead(nn.Module):
    """Memory (B, H*W, C) of an (H, W) grid -> per layer class logits (B, Q, K+1) and boxes (B, Q, 4).

    Boxes are normalised (cx, cy, w, h) in [0, 1]; class K is "no object".
    """

    def __init__(
        self, *, in_dim: int, num_classes: int, d_model: int = 256, num_heads: int = 8, num_layers: int = 6,
        dim_feedforward: int = 2048, dropout: float = 0.1, num_queries: int = 100, pos_temperature: float = 10000.0,
    ):
        super().__init__()
        self.input_proj = nn.Linear(in_dim, d_model)  # DETR's 1x1 conv, on tokens
        self.query_pos = nn.Embedding(num_queries, d_model)
        self.layers = nn.ModuleList(DecoderLayer(d_model, num_heads, dim_feedforward, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)  # shared by every layer's output, as in DETR
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, [d_model, d_model, 4])  # DETR's 3-layer box FFN
        self.d_model, self.pos_temperature = d_model, pos_temperature

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> dict:
        memory = self.input_proj(features)
        memory_pos = sine_position_encoding(*grid, self.d_model, temperature=self.pos_temperature).to(memory)[None]
        query_pos = self.query_pos.weight[None].expand(memory.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        layers = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos=query_pos, memory_pos=memory_pos)
            hidden = self.norm(tgt)
            layers.append({"logits": self.class_embed(hidden), "boxes": self.bbox_embed(hidden).sigmoid()})
        return {**layers[-1], "aux": layers[:-1]}
