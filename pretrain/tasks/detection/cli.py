"""`python -m pretrain detect --config configs/detect/X.yaml [key.sub=value ...]`: DETR-style
detection transfer of an exported backbone (see pretrain/tasks/detection/run.py)."""
from __future__ import annotations

import argparse

from pretrain.config import load_config
from pretrain.tasks.detection.config import DetectConfig
from pretrain.engine.distributed import init_distributed, print0, shutdown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/detect/shapes_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(DetectConfig, args.config, args.overrides)  # fails before any work
    from pretrain.tasks.detection.run import run  # DeepSpeed and the data stack load only for a valid recipe

    dist_info = init_distributed()
    try:
        final = run(cfg, dist_info)
        print0("final " + " ".join(f"{k}={v:.4g}" for k, v in final.items()))
    finally:
        shutdown()
    return 0
