"""The ViT family on timm's classes, with the options the ViT paper ablates.

`resolve_vit(...)` turns the registry's shape plus the user's options into a build recipe:

| option                              | built on                                   | timm can load it |
|-------------------------------------|--------------------------------------------|------------------|
| pos_embed="learn" / "none"          | timm `VisionTransformer` (or R50 hybrid)   | yes              |
| class_token=False, global_pool="avg"| same (timm arguments)                      | yes              |
| pos_embed="rel"                     | timm `VisionTransformerRelPos`, per-head   | yes              |
|                                     | bias per 2-D offset (rel_pos_type="bias")* |                  |
| gpsa_blocks=N                       | timm `ConVit` (GPSA in blocks < N, class   | yes              |
|                                     | token inserted after them), checkpointable |                  |
| pos_embed="2d"                      | `ViT` below: x and y halves of D           | no               |
| pre_logits_size=R                   | `ViT` below: Linear(D, R) + tanh, then head| no               |
| block="parallel"                    | `ViT` below with timm's ParallelScalingBlock| no              |
|                                     | (ViT-22B: parallel attn + MLP, q/k norm)   |                  |

Everything else (img_size, drop_path_rate, weight_init, ...) goes to the timm constructor.
* The paper's relative variant adds query-dependent logits (q . r_offset); timm's learned
  bias per offset and head is the content-free form of it (Swin/BEiT), chosen to stay timm-loadable.
"""
from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable
from unittest import mock

import timm
import torch
import torch.nn as nn
from timm.layers import HybridEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import checkpoint
from timm.models.convit import ConVit
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

POS_EMBED_KINDS = ("learn", "none", "2d", "rel")
# Block layouts. parallel: ViT-22B's (Dehghani et al. 2023, sec. 2): attention and MLP side by side
# on one LayerNorm (their input projections fused), LayerNorm on queries and keys, no bias in the
# QKV projection nor in any LayerNorm; timm's ParallelScalingBlock, with the output projections
# fused too. The MLP keeps its biases, as in the paper.
BLOCKS: dict[str, dict[str, Any]] = {
    "serial": {},
    "parallel": dict(block_fn=partial(ParallelScalingBlock, fuse_out_proj=True), qk_norm=True, qkv_bias=False,
                     norm_layer=partial(nn.LayerNorm, eps=1e-6, bias=False)),
}
# timm names whose constructors take the full shape from keyword arguments.
RELPOS_TIMM_NAME = "vit_relpos_base_patch16_224"
CONVIT_TIMM_NAME = "convit_base"


@dataclass(frozen=True)
class BuildPlan:
    """How to build one configured model, and the timm name/kwargs that rebuild it (None: timm lacks it)."""

    build: Callable[[], nn.Module]
    timm_name: str | None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    init: Callable[[nn.Module], None] | None = None  # run by build_model on the built model (see init_vit_weights)


def axial_pos_grid(pos_h: torch.Tensor, pos_w: torch.Tensor) -> torch.Tensor:
    """(1, H, D_h), (1, W, D_w) -> (1, H*W, D_h + D_w): row y's table beside column x's, per patch."""
    gh, gw = pos_h.shape[1], pos_w.shape[1]
    return torch.cat([pos_h[:, :, None].expand(-1, -1, gw, -1), pos_w[:, None].expand(-1, gh, -1, -1)], dim=-1).flatten(1, 2)


def resample_axial_pos_embed(pos_h: torch.Tensor, pos_w: torch.Tensor,
                             new_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample 2-D (x/y-halves) embeddings to `new_grid` with timm's 2-D resampling.

    The halves are expanded to the full grid, resampled by `timm.layers.resample_abs_pos_embed`
    (bicubic, separable, so each half stays constant along its other axis), and read back.
    """
    dh = pos_h.shape[-1]
    out = resample_abs_pos_embed(axial_pos_grid(pos_h, pos_w), list(new_grid),
                                 old_size=[pos_h.shape[1], pos_w.shape[1]], num_prefix_tokens=0)
    out = out.reshape(1, new_grid[0], new_grid[1], -1)
    return out[:, :, 0, :dh].contiguous(), out[:, 0, :, dh:].contiguous()


def _gathered(params) -> contextlib.AbstractContextManager:
    """ZeRO-3 partitioned `params` gathered whole on every rank (rank 0's values kept on exit); a no-op for plain ones."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _gathered_named_apply(fn: Callable, module: nn.Module, name: str = "", depth_first: bool = True,
                          include_root: bool = False) -> nn.Module:
    """timm's `named_apply` (depth first) with each module's own parameters gathered around `fn`."""
    if not depth_first:
        raise ValueError("timm's ViT init walks depth first")
    for child_name, child in module.named_children():
        _gathered_named_apply(fn, child, f"{name}.{child_name}" if name else child_name, include_root=True)
    if include_root:
        with _gathered(module.parameters(recurse=False)):
            fn(module=module, name=name)
    return module


def init_vit_weights(model: VisionTransformer, *, mode: str, needs_reset: bool) -> None:
    """timm's `model.init_weights(mode)`, run after construction instead of at its end.

    Under ZeRO-3's `deepspeed.zero.Init` every module's parameters are partitioned as soon as its
    own `__init__` returns, so the init timm runs at the end of `VisionTransformer.__init__` would
    write into the blocks' empty partitions: zero.Init gathers parameters only inside
    `Module.apply`, and timm walks the modules with its own `named_apply`. Built with
    `weight_init="skip"` and initialised here, timm's walk runs with one module's parameters
    gathered at a time, so no rank holds more than a layer whole. The random draws are the same,
    in the same order, as timm's constructor makes them: the weights are identical with and
    without zero.Init (tests/pretrain/engine/test_zero_init.py).
    """
    owners = {sys.modules[c.__module__] for c in type(model).__mro__ if "init_weights" in c.__dict__}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_gathered(model.parameters(recurse=False)))  # pos_embed, tokens: the root's own
        for owner in owners:
            if hasattr(owner, "named_apply"):
                stack.enter_context(mock.patch.object(owner, "named_apply", _gathered_named_apply))
        model.weight_init_mode = mode  # timm reads it for mode "" (it set "reset" when skipped)
        model.init_weights(mode, needs_reset=needs_reset)


class ViT(VisionTransformer):
    """timm's VisionTransformer plus the two ViT-paper options timm lacks.

    pos_embed="2d": two learned tables, one per axis, each D/2 wide, concatenated per patch (ViT
    paper, App. D.4); prefix tokens get none (a learned class token needs no learned offset).
    pre_logits_size=R: the pretraining head Linear(D, R) + tanh before the classifier. Fine-tuning
    drops it, as the paper does: `reset_classifier` replaces both layers by one linear layer.
    """

    def __init__(self, *, pos_embed: str = "learn", pre_logits_size: int | None = None, weight_init: str = "", **kwargs: Any):
        axial = pos_embed == "2d"
        if axial and kwargs.get("dynamic_img_size"):
            raise ValueError("pos_embed='2d' needs a fixed grid; drop dynamic_img_size or use pos_embed='learn'")
        # timm's init runs once every layer below exists (init_weights covers the extras)
        super().__init__(pos_embed="none" if axial else pos_embed, weight_init="skip", **kwargs)
        self.pos_embed_h = self.pos_embed_w = None
        if axial:
            gh, gw = self.patch_embed.grid_size
            half = self.embed_dim // 2
            self.pos_embed_h = nn.Parameter(torch.empty(1, gh, half))
            self.pos_embed_w = nn.Parameter(torch.empty(1, gw, self.embed_dim - half))
        self.pre_logits = nn.Identity()
        if pre_logits_size:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(self.embed_dim, pre_logits_size), act=nn.Tanh()))
            self.head_hidden_size = pre_logits_size
            self.head = nn.Linear(pre_logits_size, self.num_classes) if self.num_classes > 0 else nn.Identity()
        if weight_init != "skip":
            self.weight_init_mode = weight_init
            self.init_weights(weight_init, needs_reset=False)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset=needs_reset)
        for table in (self.pos_embed_h, self.pos_embed_w):
            if table is not None:
                trunc_normal_(table, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"pos_embed_h", "pos_embed_w"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.pre_logits = nn.Identity()
        self.head_hidden_size = self.embed_dim
        super().reset_classifier(num_classes, global_pool)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        if self.pos_embed_h is not None:
            h, w = resample_axial_pos_embed(self.pos_embed_h.data, self.pos_embed_w.data, self.patch_embed.grid_size)
            self.pos_embed_h, self.pos_embed_w = nn.Parameter(h), nn.Parameter(w)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed_h is None:
            return super()._pos_embed(x)
        # With no `pos_embed`, timm's method only prepends the prefix tokens.
        return self.pos_drop(super()._pos_embed(x + axial_pos_grid(self.pos_embed_h, self.pos_embed_w)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pre_logits(self.fc_norm(self.pool(x))))
        return x if pre_logits else self.head(x)


class ConViT(ConVit):
    """timm's ConVit with per-block activation checkpointing (timm's refuses it) and input resizing."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.grad_checkpointing = False

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """GPSA's relative offsets are recomputed per grid; only the absolute table is resampled."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        if self.use_pos_embed:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(
                self.pos_embed.data, list(self.patch_embed.grid_size), old_size=list(old_grid), num_prefix_tokens=0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.use_pos_embed:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        for i, block in enumerate(self.blocks):
            if i == self.local_up_to_layer:
                x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = checkpoint(block, x) if self.grad_checkpointing and not torch.jit.is_scripting() else block(x)
        return self.norm(x)


def _unsupported(option: str, reason: str) -> ValueError:
    return ValueError(f"{option} is not supported {reason}")


def resolve_vit(
    *,
    timm_name: str,
    num_classes: int,
    hybrid_layers: tuple[int, ...] | None = None,
    pos_embed: str = "learn",
    gpsa_blocks: int = 0,
    locality_strength: float = 1.0,
    pre_logits_size: int | None = None,
    block: str = "serial",
    **timm_kwargs: Any,
) -> BuildPlan:
    """Build recipe for a ViT of the registry (shape in `timm_kwargs`) with the paper's options."""
    if block not in BLOCKS:
        raise ValueError(f"block={block!r} unknown; choose one of {', '.join(BLOCKS)}")
    if block == "parallel":
        if gpsa_blocks or pos_embed == "rel":
            raise _unsupported("block='parallel'", "with gpsa_blocks or pos_embed='rel'")
        timm_kwargs = {**BLOCKS[block], **timm_kwargs}
    if pos_embed not in POS_EMBED_KINDS:
        raise ValueError(f"pos_embed={pos_embed!r} unknown; choose one of {', '.join(POS_EMBED_KINDS)}")
    if timm_kwargs.get("class_token") is False:
        timm_kwargs.setdefault("global_pool", "avg")  # no token to pool: the paper's GAP classifier
    kwargs = dict(num_classes=num_classes, **timm_kwargs)

    if locality_strength != 1.0 and not gpsa_blocks:
        raise ValueError("locality_strength scales GPSA's local init; it needs gpsa_blocks > 0")
    if gpsa_blocks:
        return _resolve_convit(kwargs, hybrid_layers, pos_embed, gpsa_blocks, locality_strength, pre_logits_size)
    if pos_embed == "rel":
        if hybrid_layers is not None or pre_logits_size:
            raise _unsupported("pos_embed='rel'", "with hybrids or pre_logits_size; use pos_embed='learn', 'none' or '2d'")
        # The ViT's defaults over VisionTransformerRelPos's; init_values=0 turns off layer scale
        # (timm.create_model drops None-valued arguments, so None would restore its 1e-6).
        relpos = dict(qkv_bias=True, class_token=True, global_pool="token", init_values=0.0, rel_pos_type="bias")
        relpos = {**relpos, **kwargs}
        relpos.setdefault("fc_norm", relpos["global_pool"] == "avg")
        return BuildPlan(partial(timm.create_model, RELPOS_TIMM_NAME, **relpos), RELPOS_TIMM_NAME, relpos)
    init = partial(init_vit_weights, mode=kwargs.pop("weight_init", ""), needs_reset=False)
    if pos_embed == "2d" or pre_logits_size or block != "serial":
        extras = dict(pos_embed=pos_embed, pre_logits_size=pre_logits_size, hybrid_layers=hybrid_layers, **kwargs)
        return BuildPlan(partial(_build_vit, weight_init="skip", **extras), None, {}, init)
    kwargs["pos_embed"] = pos_embed
    return BuildPlan(partial(timm.create_model, timm_name, weight_init="skip", **kwargs), timm_name, kwargs, init)


def _resolve_convit(kwargs: dict[str, Any], hybrid_layers, pos_embed: str, gpsa_blocks: int,
                    locality_strength: float, pre_logits_size: int | None) -> BuildPlan:
    if hybrid_layers is not None or pre_logits_size or pos_embed in ("2d", "rel"):
        raise _unsupported("gpsa_blocks", "with hybrids, pre_logits_size or pos_embed '2d'/'rel' (ConViT has learned 1-D or none)")
    if kwargs.pop("class_token", True) is False:
        raise _unsupported("class_token=False", "with gpsa_blocks: ConViT inserts its class token after the GPSA "
                           "blocks; set global_pool='avg' to classify from the average token instead")
    depth, heads, dim = kwargs["depth"], kwargs["num_heads"], kwargs.pop("embed_dim")
    if not 0 < gpsa_blocks <= depth:
        raise ValueError(f"gpsa_blocks={gpsa_blocks} must lie in 1..depth={depth}")
    if gpsa_blocks == depth and kwargs.get("global_pool", "token") == "token":
        raise ValueError("with GPSA in every block no class token is ever inserted; set global_pool='avg'")
    convit = dict(
        qkv_bias=True,  # the ViT's projections; ConViT's own models have none
        **kwargs,
        embed_dim=dim // heads,  # ConVit's embed_dim is per head
        local_up_to_layer=gpsa_blocks,
        locality_strength=locality_strength,
        use_pos_embed=pos_embed == "learn",
    )
    return BuildPlan(partial(_build_convit, **convit), CONVIT_TIMM_NAME, convit)


def _build_vit(*, hybrid_layers: tuple[int, ...] | None = None, **kwargs: Any) -> nn.Module:
    if hybrid_layers is not None:
        # timm's own ResNet builder for its hybrids (BiT: GroupNorm, weight-standardised convs), so
        # the stem matches the timm hybrid of the same shape.
        from timm.models.vision_transformer_hybrid import _resnetv2

        kwargs.setdefault("patch_size", 1)
        kwargs["embed_layer"] = partial(HybridEmbed, backbone=_resnetv2(hybrid_layers, in_chans=kwargs.get("in_chans", 3)))
    return ViT(**kwargs)


def _build_convit(**kwargs: Any) -> nn.Module:
    try:
        return ConViT(**kwargs)
    except TypeError as err:
        raise TypeError(f"gpsa_blocks builds timm's ConVit, which takes fewer arguments than ViT: {err}") from None

