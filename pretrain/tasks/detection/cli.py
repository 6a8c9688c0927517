"""`python -m pretrain detect --config configs/detect/X.yaml [key.sub=value ...]`: DETR-style
detection transfer of an exported backbone (see pretrain/tasks/detection/run.py)."""
from __future__ import annotations

import argparse

from pretrain.engine.distributed import DistInfo
from pretrain.tasks.detection.config import DetectConfig
from pretrain.tasks.recipe import add_recipe_arguments, run_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, example="configs/detect/shapes_tiny.yaml")


def run(cfg: DetectConfig, dist_info: DistInfo) -> dict[str, float]:
    from pretrain.tasks.detection.run import run as run_detection  # DeepSpeed and the data stack load only for a valid recipe

    return run_detection(cfg, dist_info)


def main(args: argparse.Namespace) -> int:
    return run_recipe(DetectConfig, args, run)
