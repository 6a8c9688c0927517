"""Attention rollout (Abnar & Zuidema 2020): how much each input patch reaches the output.

Each layer's head-averaged attention, mixed half-and-half with the identity for the residual
path and renormalised, is multiplied through the depth. The map is the class token's row
over the patches, or, for models that pool without a class token, the mean of the patch rows.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pretrain.analysis.attention_distance import token_layout


def attention_rollout(
    attentions: Sequence[torch.Tensor], *, grid: tuple[int, int] | None = None, num_prefix: int = 0
) -> torch.Tensor:
    """(B, rows, cols) rollout maps, each scaled to [0, 1], from per-layer (B, H, N, N) probabilities."""
    rollout: torch.Tensor | None = None
    for probs in attentions:
        attn = probs.double().mean(1)
        n = attn.shape[-1]
        eye = torch.eye(n, dtype=attn.dtype, device=attn.device)
        attn = 0.5 * attn + 0.5 * eye
        attn = attn / attn.sum(-1, keepdim=True)
        if rollout is not None and rollout.shape[-1] < n:
            # Tokens added at the front mid-network (ConViT's class token after the GPSA
            # layers) carry no input patch so far: they enter the product as identity.
            grown = eye.expand(attn.shape[0], n, n).clone()
            grown[:, n - rollout.shape[-1]:, n - rollout.shape[-1]:] = rollout
            rollout = grown
        elif rollout is not None and rollout.shape[-1] != n:
            raise ValueError(f"attention rollout needs one token set through the depth; got {rollout.shape[-1]} then {n} tokens")
        rollout = attn if rollout is None else attn @ rollout
    if rollout is None:
        raise ValueError("attention rollout needs at least one attention layer")
    layout = token_layout(rollout.shape[-1], grid=grid, num_prefix=num_prefix)
    p = layout.num_prefix
    maps = rollout[:, 0, p:] if p else rollout.mean(1)
    maps = maps - maps.amin(-1, keepdim=True)
    maps = maps / maps.amax(-1, keepdim=True).clamp_min(1e-12)
    return maps.reshape(-1, *layout.grid).float()
