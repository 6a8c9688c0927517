"""Objectives by name; importing a module registers its objectives."""
from pretrain.objectives import mae, mpp, supervised  # noqa: F401  (registers)
from pretrain.objectives.registry import OBJECTIVES, build_objective, register_objective

__all__ = ["OBJECTIVES", "build_objective", "register_objective"]
