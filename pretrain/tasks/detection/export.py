"""The trained detector as safetensors + a JSON sidecar, and back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from data_pipeline.storage import atomic_path, write_atomic
from pretrain.tasks.detection.config import DetectConfig
from pretrain.tasks.detection.head import DETRHead
from pretrain.tasks.detection.model import Detector
from pretrain.engine.deepspeed_engine import full_state_dict


def save_detector(detector: Detector, path: str | Path, *, is_main: bool, meta: dict[str, Any]) -> Path:
    """Every rank calls this (ZeRO-3 gathers the weights collectively); rank 0 writes, atomically."""
    state = full_state_dict(detector, is_main=is_main)
    path = Path(path)
    if is_main:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
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
    name, kwargs = (exported["model"], exported.get("model_kwargs", {})) if exported else (cfg.backbone.model, cfg.backbone.kwargs)
    backbone = build_model(name, num_classes=0, **{**kwargs, "img_size": cfg.data.image_size})
    head = DETRHead(in_dim=backbone.num_features, num_classes=cfg.data.num_classes, **cfg.head.model_dump())
    detector = Detector(backbone, head)
    detector.load_state_dict(load_file(str(path)), strict=True)
    return detector.eval(), meta
