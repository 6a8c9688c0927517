"""Forward FLOPs per image, counted by torch's FLOP counter on the meta device (no memory, no compute)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


def _count(model: nn.Module, batch: int, img_size: tuple[int, int], in_chans: int, tensors: dict | None) -> int:
    images = torch.empty(batch, in_chans, *img_size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        if tensors is None:
            model(images)
        else:
            functional_call(model, tensors, (images,), strict=False)
    return counter.get_total_flops()


def flops_per_image(model_or_name: str | nn.Module, img_size: int | tuple[int, int], *, in_chans: int = 3,
                    num_classes: int = 1000, **model_kwargs: Any) -> int:
    """Forward FLOPs of one image at `img_size` (2 per multiply-add, matmuls and convolutions).

    `model_or_name`: a registry name (built on the meta device with `model_kwargs`) or a built
    model (run with meta stand-ins for its tensors, so its weights and statistics are untouched).
    The count is the marginal cost of one more image (batch 2 minus batch 1): work shared by the
    whole batch, such as PerViT's position MLP over distances, is left out. A training step costs
    about 3x this (forward and backward), plus one forward more per checkpointed block.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if isinstance(model_or_name, str):
        from pretrain.models.registry import build_model

        with torch.device("meta"):
            model = build_model(model_or_name, num_classes=num_classes, img_size=size, in_chans=in_chans, **model_kwargs)
        tensors = None
    else:
        if model_kwargs:
            raise TypeError(f"model arguments {sorted(model_kwargs)} apply to a registry name, not a built model")
        model = model_or_name
        # ZeRO-3 partitioned parameters are empty outside forward; ds_shape is their full shape
        tensors = {k: torch.empty(getattr(v, "ds_shape", v.shape), dtype=v.dtype, device="meta")
                   for k, v in [*model.named_parameters(), *model.named_buffers()]}
    return _count(model, 2, size, in_chans, tensors) - _count(model, 1, size, in_chans, tensors)
