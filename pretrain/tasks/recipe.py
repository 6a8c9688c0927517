"""What every recipe command (`train`, `transfer`, `detect`) shares: `--config R.yaml [key.sub=value
...]`, the recipe validated before any work, then the task run on every rank and one summary line."""
from __future__ import annotations

import argparse
from typing import Any, Callable, TypeVar

from pretrain.config import load_config
from pretrain.engine.distributed import DistInfo, init_distributed, print0, shutdown

Cfg = TypeVar("Cfg")


def add_recipe_arguments(parser: argparse.ArgumentParser, *, example: str,
                         overrides_help: str = "key.sub=value overrides of the recipe") -> None:
    parser.add_argument("--config", required=True, help=f"YAML recipe, e.g. {example}")
    parser.add_argument("overrides", nargs="*", help=overrides_help)


def final_line(cfg: Any, final: dict[str, Any]) -> str:
    return "final " + " ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float))


def run_recipe(config_type: type[Cfg], args: argparse.Namespace, run: Callable[[Cfg, DistInfo], dict[str, Any]],
               summary: Callable[[Cfg, dict[str, Any]], str] = final_line) -> int:
    cfg = load_config(config_type, args.config, args.overrides)  # fails before any work
    dist_info = init_distributed()
    try:
        print0(summary(cfg, run(cfg, dist_info)))
    finally:
        shutdown()
    return 0
