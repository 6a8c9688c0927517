"""Training objectives: modules that wrap a backbone and return (loss, metrics).

DeepSpeed wraps the objective module, so everything an objective trains (a decoder, a
mask token) lives inside it; exports keep only `objective.backbone`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

OBJECTIVES: dict[str, Callable[..., nn.Module]] = {}


def register_objective(name: str):
    def wrap(cls):
        OBJECTIVES[name] = cls
        return cls

    return wrap


def build_objective(name: str, backbone: nn.Module, **kwargs: Any) -> nn.Module:
    """`kwargs` are the objective's own typed keyword arguments (`train.objective_kwargs`)."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    try:
        return OBJECTIVES[name](backbone, **kwargs)
    except TypeError as err:
        raise TypeError(f"train.objective_kwargs do not fit objective {name!r}: {err}") from None
