"""The trained detector as safetensors + a JSON sidecar, and back."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pretrain.detection.config import DetectConfig
from pretrain.detection.head import DETRHead
from pretrain.detection.model import Detector, resize_backbone


def save_detector(detector: Detector, path: str | Path, *, is_main: bool, meta: dict[str, Any]) -> Path:
    """Every rank calls this (ZeRO-3 gathers the weights collectively); rank 0 writes, temp name then rename."""
    import deepspeed

    path = Path(path)
    with deepspeed.zero.GatheredParameters(list(detector.parameters()), modifier_rank=None):
        if is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in detector.state_dict().items()}
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            side, side_tmp = path.with_suffix(".json"), path.with_name(f".{path.stem}.json.tmp{os.getpid()}")
            side_tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, path)
            os.replace(side_tmp, side)
    return path


def load_detector(path: str | Path) -> tuple[Detector, dict[str, Any]]:
    """Rebuild a saved detector (eval mode) from its sidecar and load its weights strictly."""
    from pretrain.models import build_model

    path = Path(path)
    side = path.with_suffix(".json")
    if not path.is_file() or not side.is_file():
        raise FileNotFoundError(f"detector {path} (and its sidecar {side.name}) not found; `python -m pretrain detect` writes them")
    meta = json.loads(side.read_text())
    cfg = DetectConfig.model_validate(meta["config"])
    exported = meta["backbone_meta"]
    if exported:
        backbone = build_model(exported["model"], num_classes=0, **exported.get("model_kwargs", {}))
    else:
        backbone = build_model(cfg.backbone.model, num_classes=0, **cfg.backbone.kwargs)
    grid = resize_backbone(backbone, cfg.data.image_size)
    head = DETRHead(in_dim=backbone.num_features, num_classes=cfg.data.num_classes, **cfg.head.model_dump())
    detector = Detector(backbone, head, grid)
    detector.load_state_dict(load_file(str(path)), strict=True)
    return detector.eval(), meta
