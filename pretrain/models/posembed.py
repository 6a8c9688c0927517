"""Carry trained weights to a new resolution or patch size, for every position-embedding kind.

| kind (option)            | tensors                                      | resampled with                              |
|--------------------------|----------------------------------------------|---------------------------------------------|
| learned 1-D ("learn")    | pos_embed (1, prefix + H*W, D)               | timm `resample_abs_pos_embed`, prefix kept  |
| 2-D x/y halves ("2d")    | pos_embed_h (1, H, D/2), pos_embed_w (1, W, D/2) | the same, on the expanded grid          |
| relative ("rel")         | blocks.*.attn.rel_pos.relative_position_bias_table | timm `resize_rel_pos_bias_table`      |
| GPSA (gpsa_blocks)       | pos_embed (1, H*W, D); GPSA offsets are relative, recomputed per grid | as learned 1-D |
| none, PerViT             | nothing: PerViT's distances are recomputed per grid                     | -                |
| new patch size           | patch_embed.proj.weight                       | timm `resample_patch_embed` (FlexiViT)     |
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, resample_patch_embed, resize_rel_pos_bias_table

from pretrain.models.registry import build_model
from pretrain.models.vit import resample_axial_pos_embed


def _meta_model(model_name: str, img_size: int, patch_size: int | None, model_kwargs: dict[str, Any]) -> nn.Module:
    kwargs = dict(model_kwargs)
    kwargs.pop("num_classes", None)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    with torch.device("meta"):
        return build_model(model_name, num_classes=0, img_size=img_size, **kwargs)


def resize_pos_embed_in_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    model_name: str,
    old_img_size: int,
    new_img_size: int,
    new_patch_size: int | None = None,
    **model_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Weights of `build_model(model_name, img_size=old_img_size, **model_kwargs)`, made to fit the
    same model at `new_img_size` (and `new_patch_size`, if given).

    Position tables are interpolated in 2-D over the patch grid (bicubic, prefix tokens kept);
    other tensors are returned as they are. Raises ValueError naming any other tensor whose shape
    the new size changes.
    """
    old = _meta_model(model_name, old_img_size, None, model_kwargs)
    new = _meta_model(model_name, new_img_size, new_patch_size, model_kwargs)
    old_grid, new_grid = tuple(old.patch_embed.grid_size), tuple(new.patch_embed.grid_size)
    target = new.state_dict()
    out = dict(state_dict)
    if {"pos_embed_h", "pos_embed_w"} <= out.keys():
        out["pos_embed_h"], out["pos_embed_w"] = resample_axial_pos_embed(out["pos_embed_h"], out["pos_embed_w"], new_grid)
    for key, value in state_dict.items():
        if key not in target or key in ("pos_embed_h", "pos_embed_w"):
            continue
        if key == "pos_embed":
            prefix = value.shape[1] - old_grid[0] * old_grid[1]
            out[key] = resample_abs_pos_embed(value, list(new_grid), old_size=list(old_grid), num_prefix_tokens=prefix)
        elif key.endswith("relative_position_bias_table"):
            out[key] = resize_rel_pos_bias_table(value, new_grid, tuple(target[key].shape), old_window_size=old_grid)
        elif key == "patch_embed.proj.weight" and value.shape != target[key].shape:
            out[key] = resample_patch_embed(value, list(target[key].shape[-2:]))
        elif value.shape != target[key].shape:
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} does not fit {model_name} at {new_img_size} px "
                f"(needs {tuple(target[key].shape)}) and no resampling rule covers it; were these weights "
                f"trained at {old_img_size} px with the same model arguments {model_kwargs}?"
            )
    return out
