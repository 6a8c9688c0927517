"""What the analyses read out of a model: attention probabilities and layer representations.

Attention comes from forward hooks on modules named `attn_drop`: every attention module of the
project passes its (B, heads, N, N) probabilities through one (timm's `Attention` when
`fused_attn=False`, ConViT's GPSA and MHSA always, PerViT by the models package's convention).
Representations are block outputs: `blocks.*` of a ViT, or the blocks of each timm feature
stage (`layer1.0`, ... of a ResNet).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

Callback = Callable[[int, torch.Tensor], None]  # (layer index, tensor)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The `attn_drop` submodules in layer order, named by their attention module."""
    return [(name.rsplit(".", 1)[0], m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "attn_drop"]


def representation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Blocks whose outputs are the model's layer representations, in forward order."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        raise ValueError(
            f"{type(model).__name__} has neither `blocks` nor timm `feature_info`: "
            "cannot tell which modules are its layers"
        )
    modules = dict(model.named_modules())
    out = []
    for info in feature_info:
        stage = modules[info["module"]]
        if isinstance(stage, nn.Sequential):  # a ResNet stage: each residual block is a layer
            out += [(f"{info['module']}.{child}", m) for child, m in stage.named_children()]
        else:
            out.append((info["module"], stage))
    return out


@contextmanager
def recording(
    model: nn.Module,
    *,
    on_attention: Callback | None = None,
    on_representation: Callback | None = None,
) -> Iterator[tuple[list[str], list[str]]]:
    """Within the block, every forward of `model` calls back with each layer's attention
    probabilities (B, H, N, N) and/or flattened output (B, D); yields the layer names.

    Callbacks reduce each tensor as it comes, so memory holds one layer at a time. timm
    attention modules are switched to the unfused path (which goes through `attn_drop`)
    and switched back on exit.
    """
    attn = attention_modules(model) if on_attention else []
    reps = representation_modules(model) if on_representation else []
    if on_attention and not attn:
        raise ValueError(
            f"{type(model).__name__} has no `attn_drop` modules: attention analyses need attention "
            "probabilities passed through a submodule named `attn_drop`"
        )
    fused = {m: m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)}
    handles = []
    try:
        for m in fused:
            m.fused_attn = False
        for i, (_, m) in enumerate(attn):
            handles.append(m.register_forward_hook(lambda _m, _in, out, i=i: on_attention(i, out.detach())))
        for i, (_, m) in enumerate(reps):
            handles.append(m.register_forward_hook(
                lambda _m, _in, out, i=i: on_representation(i, _first_tensor(out).detach().flatten(1).float())))
        yield [n for n, _ in attn], [n for n, _ in reps]
    finally:
        for h in handles:
            h.remove()
        for m, value in fused.items():
            m.fused_attn = value


def _first_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_attention(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities (B, H, N, N) of every attention layer for one batch."""
    maps: dict[int, torch.Tensor] = {}
    with recording(model, on_attention=maps.__setitem__):
        model(images)
    return [maps[i] for i in sorted(maps)]


@torch.no_grad()
def capture_representations(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Flattened outputs (B, D) of every layer for one batch."""
    reps: dict[int, torch.Tensor] = {}
    with recording(model, on_representation=reps.__setitem__):
        model(images)
    return [reps[i] for i in sorted(reps)]
