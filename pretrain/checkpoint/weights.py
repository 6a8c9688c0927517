"""The one loader of pretrained weights: few-shot, analysis, fine-tuning and detection read them here.

| use                 | call                                        | model                                                  |
|---------------------|---------------------------------------------|--------------------------------------------------------|
| few-shot, analysis  | `load_exported(path)`                       | the exported model whole; few-shot reads its pre-logits (the tanh layer of `pre_logits_size`, if any), as big_vision does |
| fine-tuning         | `load_exported(path, num_classes=K)`        | the whole pretraining head removed (tanh pre-logits included) and one zero-initialised D x K linear layer (ViT paper sec. 3.2, App. B.1.1) |
| detection           | `load_exported(path, num_classes=0)`        | the backbone alone, no head                            |

`image_size` builds any of them for another resolution (position embeddings resampled in 2-D,
`pretrain.models.posembed`). `build_from_state_dict` does the same for weights in memory; like
timm's per-family `checkpoint_filter_fn`, one rule (`transfer_state`) maps trained weights to the
model they start.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from pretrain.models import build_model, resize_pos_embed_in_state_dict

HEAD_PREFIXES = ("head.", "pre_logits.")  # the pretraining head: classifier and tanh pre-logits layer


def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_exported(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of an exported .safetensors file and its sidecar's metadata (safetensors: no code runs)."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file() or not side.is_file():
        raise FileNotFoundError(
            f"exported model {path} (and its sidecar {side.name}) not found; "
            "make one with `python -m pretrain export --checkpoint DIR --out FILE.safetensors`"
        )
    return load_file(str(path), device=str(device)), json.loads(side.read_text())


def headless_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model arguments without the pretraining head's (`pre_logits_size`)."""
    return {k: v for k, v in model_kwargs.items() if k != "pre_logits_size"}


def transfer_state(state_dict: dict[str, torch.Tensor], model_kwargs: dict[str, Any], *,
                   new_head: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Trained weights and model arguments -> those of the model that starts from them.

    new_head=True: the pretraining head goes whole, tanh pre-logits layer included (so the
    architecture loses `pre_logits_size`); new_head=False: every weight is kept.
    """
    if not new_head:
        return state_dict, dict(model_kwargs)
    return {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}, headless_kwargs(model_kwargs)


def build_from_state_dict(
    model_name: str,
    state_dict: dict[str, torch.Tensor],
    *,
    num_classes: int,
    old_img_size: int,
    img_size: int,
    new_patch_size: int | None = None,
    new_head: bool = True,
    grad_checkpointing: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """`model_name` built for `img_size` with the weights `state_dict` trained at `old_img_size`.

    new_head=True (fine-tuning, detection): the pretraining head is dropped whole and a
    zero-initialised linear head of `num_classes` attached (none for 0). new_head=False: every
    weight is kept (num_classes must be the trained one). `model_kwargs` are the training run's
    model arguments (the sidecar's "model_kwargs").
    """
    if "img_size" in model_kwargs:
        raise TypeError("pass the sizes as old_img_size/img_size, not inside the model arguments")
    state, model_kwargs = transfer_state(state_dict, model_kwargs, new_head=new_head)
    state = resize_pos_embed_in_state_dict(
        state, model_name=model_name, old_img_size=old_img_size, new_img_size=img_size,
        new_patch_size=new_patch_size, **model_kwargs,
    )
    if new_patch_size is not None:
        model_kwargs = {**model_kwargs, "patch_size": new_patch_size}
    model = build_model(model_name, num_classes=num_classes, grad_checkpointing=grad_checkpointing,
                        zero_head=new_head, img_size=img_size, **model_kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if new_head:
        missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if missing or unexpected:
        raise KeyError(
            f"weights do not fit {model_name} with arguments {model_kwargs}: missing {missing}, unexpected "
            f"{unexpected}; pass the model arguments the weights were trained with"
        )
    return model


def load_exported(path: str | Path, *, device: str | torch.device = "cpu", image_size: int | None = None,
                  num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported model (eval mode) and return it with its sidecar metadata.

    num_classes=None: the model as exported. num_classes=K: the backbone under a fresh zero
    head of K classes, the pretraining head removed whole (K=0: no head). The returned
    metadata describes the model returned (its image size, classes and model arguments).
    """
    state, meta = read_exported(path, device=device)
    new_head = num_classes is not None
    num_classes = num_classes if new_head else meta["num_classes"]
    kwargs = {k: v for k, v in meta.get("model_kwargs", {}).items() if k != "img_size"}  # the sidecar's image_size rules
    size = image_size or meta["image_size"]
    try:
        model = build_from_state_dict(meta["model"], state, num_classes=num_classes, old_img_size=meta["image_size"],
                                      img_size=size, new_head=new_head, **kwargs)
    except KeyError as err:
        raise KeyError(f"{path}: {err.args[0]}") from None
    meta = {**meta, "image_size": size, "num_classes": num_classes,
            "model_kwargs": headless_kwargs(kwargs) if new_head else kwargs}
    return model.to(device).eval(), meta
