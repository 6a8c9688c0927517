"""The DeepSpeed engine: its JSON config generated from our typed config, the optimizer, one
train step, and full-weight copies of a (possibly ZeRO-3 partitioned) module for evaluation."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import EngineConfig, OptimConfig
from pretrain.engine.schedule import lr_multiplier

BACKBONE = "backbone"  # every objective keeps its model in this attribute


def _deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_grad_accum(engine: EngineConfig, *, micro_batch: int, world_size: int) -> int:
    """Accumulation steps: `engine.global_batch / (micro_batch x world_size)` when a global batch
    is set (the same recipe then runs on any number of ranks), else `engine.grad_accum_steps`."""
    if engine.global_batch is None:
        return engine.grad_accum_steps
    per_step = micro_batch * world_size
    if engine.global_batch % per_step:
        raise ValueError(
            f"engine.global_batch={engine.global_batch} is not a multiple of data.batch_size={micro_batch} "
            f"x {world_size} ranks: change data.batch_size or the number of ranks"
        )
    return engine.global_batch // per_step


# EngineConfig field -> the DeepSpeed keys it sets, only when the recipe sets it (None: DeepSpeed's default).
GPU_SETTINGS: dict[str, tuple[str, ...]] = {
    "grad_accum_dtype": ("data_types.grad_accum_dtype",),
    "communication_dtype": ("communication_data_type",),
    "overlap_comm": ("zero_optimization.overlap_comm",),
    "contiguous_gradients": ("zero_optimization.contiguous_gradients",),
    "bucket_size": ("zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size"),
    "prefetch_bucket_size": ("zero_optimization.stage3_prefetch_bucket_size",),
    "param_persistence_threshold": ("zero_optimization.stage3_param_persistence_threshold",),
    "max_live_parameters": ("zero_optimization.stage3_max_live_parameters",),
}


def deepspeed_config(engine: EngineConfig, *, micro_batch: int, grad_accum_steps: int | None = None,
                     load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON for `engine`; a user's `deepspeed_json` file overrides its keys.
    `grad_accum_steps`: from `resolve_grad_accum` (default: `engine.grad_accum_steps`)."""
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum_steps or engine.grad_accum_steps,
        "gradient_clipping": engine.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        # ZeRO without DeepSpeed's compiled optimizers: the client torch optimizer is used.
        "zero_allow_untested_optimizer": True,
        # A checkpoint from another number of ranks, converted by pretrain.checkpoint.checkpointer.
        "checkpoint": {"load_universal": load_universal},
    }
    for field, keys in GPU_SETTINGS.items():
        if (value := getattr(engine, field)) is not None:
            for key in keys:
                *parents, leaf = key.split(".")
                node = config
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
    if engine.deepspeed_json:
        path = Path(engine.deepspeed_json)
        if not path.is_file():
            raise FileNotFoundError(f"engine.deepspeed_json: {path} does not exist")
        try:
            override = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"engine.deepspeed_json: {path} is not valid JSON: {err}") from None
        if not isinstance(override, dict):
            raise ValueError(f"engine.deepspeed_json: {path} must hold a JSON object of DeepSpeed settings")
        config = _deep_update(config, override)
    return config


def build_partitioned(build: Callable[[], nn.Module], engine: EngineConfig, *, micro_batch: int) -> nn.Module:
    """`build()`, under `deepspeed.zero.Init` at ZeRO-3 with `engine.zero_init`: each module's
    parameters are partitioned over the ranks as soon as the module is built, so no rank ever
    holds the whole fp32 model (in bf16 they are made in bf16). timm's ViT init still gives the
    weights it gives without zero.Init (`pretrain.models.vit.init_vit_weights`). Every rank calls it."""
    if engine.zero_stage != 3 or not engine.zero_init:
        return build()
    import deepspeed

    # zero.Init reads the dtype and the ZeRO settings (persistence threshold) of the engine's config
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(engine, micro_batch=micro_batch)):
        return build()


def compile_blocks(module: nn.Module, *, backend: str = "inductor") -> None:
    """torch.compile each transformer block of `module.backbone` in place (torchtitan compiles per
    block too): every objective runs the blocks, MAE on its visible tokens only, and the names in
    state dicts and checkpoints stay those of the eager model. Call after `deepspeed.initialize`."""
    for block in getattr(module, BACKBONE).blocks:
        block.compile(backend=backend)


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """timm's groups: no weight decay on biases, norms, position embeddings and tokens; with
    `layer_decay`, lr x layer_decay^(depth - layer) per backbone layer (timm's group_matcher).
    Parameters outside the backbone (an objective's decoder, mask token) get the full lr."""
    backbone = getattr(model, BACKBONE, model)
    skip = {f"{BACKBONE}.{n}" if backbone is not model else n for n in getattr(backbone, "no_weight_decay", set)()}
    if optim.layer_decay is None:
        groups = param_groups_weight_decay(model, optim.weight_decay, no_weight_decay_list=skip)
        return [{**g, "lr": optim.lr} for g in groups]
    if not hasattr(backbone, "group_matcher"):
        raise ValueError(f"optim.layer_decay needs a model with timm's group_matcher(); {type(backbone).__name__} has none")
    groups = param_groups_layer_decay(backbone, optim.weight_decay, no_weight_decay_list=backbone.no_weight_decay(),
                                      layer_decay=optim.layer_decay)
    in_backbone = {id(p) for p in backbone.parameters()}
    rest = nn.ParameterList([p for p in model.parameters() if id(p) not in in_backbone and p.requires_grad])
    if len(rest):
        groups += param_groups_weight_decay(rest, optim.weight_decay)
    return [{k: v for k, v in g.items() if k != "lr_scale"} | {"lr": optim.lr * g.get("lr_scale", 1.0)}
            for g in groups if g["params"]]


# One fused kernel per step over all tensors on CUDA (None: torch's default, foreach).
FUSED_ADAM = True if torch.cuda.is_available() else None
# name -> the torch optimizer over parameter groups. The ViT paper's "Adam, weight decay 0.1" is
# flax.optim.Adam, whose decay is decoupled (p -= lr * wd * p): that is torch's AdamW. torch's
# Adam adds wd * p to the gradient.
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], OptimConfig], torch.optim.Optimizer]] = {
    "adamw": lambda groups, o: torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, fused=FUSED_ADAM),
    "adam": lambda groups, o: torch.optim.Adam(groups, lr=o.lr, betas=o.betas, fused=FUSED_ADAM),
    "sgd": lambda groups, o: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum),
}


def _group_multiplier(step: int, *, freeze_steps: int, **schedule) -> float:
    # lr 0 is an exact freeze under every ZeRO stage: AdamW/Adam/SGD updates and decay all scale with lr.
    return 0.0 if step < freeze_steps else lr_multiplier(step, **schedule)


def build_engine(model: nn.Module, groups: list[dict[str, Any]] | None = None, *, optim: OptimConfig, engine: EngineConfig,
                 micro_batch: int, total_steps: int, grad_accum_steps: int | None = None, load_universal: bool = False):
    """`deepspeed.initialize` over `model` with the optimizer `optim.name` of OPTIMIZERS and the
    schedule; returns the engine. `groups`: torch parameter groups (default: `param_groups(model,
    optim)`); a group's `freeze_steps` keeps its lr at 0 for that many steps."""
    import deepspeed

    groups = param_groups(model, optim) if groups is None else groups
    freeze = [g.get("freeze_steps", 0) for g in groups]
    groups = [{k: v for k, v in g.items() if k != "freeze_steps"} for g in groups]
    optimizer = OPTIMIZERS[optim.name](groups, optim)
    schedule = dict(total_steps=total_steps, warmup_steps=optim.warmup_steps, decay=optim.decay, min_ratio=optim.min_lr_ratio)
    multipliers = [functools.partial(_group_multiplier, freeze_steps=f, **schedule) for f in freeze]
    ds_engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=LambdaLR(optimizer, multipliers),
        config=deepspeed_config(engine, micro_batch=micro_batch, grad_accum_steps=grad_accum_steps,
                                load_universal=load_universal),
    )
    return ds_engine


def input_dtype(ds_engine) -> torch.dtype:
    return torch.bfloat16 if ds_engine.bfloat16_enabled() else torch.float32


def to_device(ds_engine, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A host batch on the engine's device, images in its compute dtype: the one place batches cross."""
    return images.to(ds_engine.device, input_dtype(ds_engine)), targets.to(ds_engine.device)


def train_step(ds_engine, batches) -> tuple[float, dict[str, float]]:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the mean loss and the
    objective's mean metrics, plus `grad_norm` (global, before clipping)."""
    losses, metrics = [], {}
    # DeepSpeed keeps the global norm of its ZeRO and bf16 optimizers; with a plain optimizer
    # (ZeRO-0, fp32) it clips without keeping it, so it is read here, from the reduced gradients.
    own_norm = not (ds_engine.zero_optimization() or ds_engine.bfloat16_enabled() or ds_engine.fp16_enabled())
    grad_norm = None
    for images, targets in batches:
        loss, step_metrics = ds_engine(*to_device(ds_engine, images, targets))
        ds_engine.backward(loss)
        if own_norm and ds_engine.is_gradient_accumulation_boundary():
            grads = [p.grad for p in ds_engine.module.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads).item()
        ds_engine.step()
        losses.append(loss.detach().float())
        for k, v in step_metrics.items():
            metrics.setdefault(k, []).append(v.detach().float())
    out = {k: torch.stack(v).mean().item() for k, v in metrics.items()}
    if grad_norm is None:
        grad_norm = ds_engine.get_global_grad_norm()
    out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    return torch.stack(losses).mean().item(), out


def full_state_dict(module: nn.Module, *, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The module's full weights and buffers, as fp32 CPU tensors on the main rank (None elsewhere).

    Under ZeRO-3 the parameters are empty placeholders outside forward: they are gathered
    (a collective: call on every rank), one module's worth at a time.
    """
    state: dict[str, torch.Tensor] = {}
    if any(hasattr(p, "ds_tensor") for p in module.parameters()):
        import deepspeed

        # Gather each submodule's own parameters in turn, so no rank holds more than one
        # layer's worth of gathered weights beyond its partition.
        for prefix, sub in module.named_modules():
            own = list(sub.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
                if is_main:
                    for name, p in sub.named_parameters(recurse=False):
                        state[f"{prefix}.{name}" if prefix else name] = p.detach().float().cpu().clone()
    if not is_main:
        return None
    state.update({k: v.detach().float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
                  for k, v in module.state_dict().items() if k not in state})
    return state


def eval_copy(module: nn.Module, build: Callable[[], nn.Module], *, is_main: bool, device: torch.device) -> nn.Module | None:
    """A plain fp32 copy of `module` in eval mode on the main rank (None elsewhere), built by
    `build()` and loaded with the full weights: evaluations and visualizations call any method
    on it (forward_features, visualize) without DeepSpeed's partitioning hooks or bf16 inputs."""
    state = full_state_dict(module, is_main=is_main)
    if not is_main:
        return None
    copy = build()
    copy.load_state_dict(state)
    return copy.to(device).eval()
