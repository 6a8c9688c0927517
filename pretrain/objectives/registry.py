"""Training objectives: modules that wrap a backbone and return (loss, metrics).

DeepSpeed wraps the objective module, so everything an objective trains (a decoder, a
mask token) lives inside it; exports keep only `objective.backbone`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.nn as nn

OBJECTIVES: dict[str, Callable[..., nn.Module]] = {}


def register_objective(name: str):
    def wrap(cls):
        OBJECTIVES[name] = cls
        return cls

    return wrap


def build_objective(name: str, backbone: nn.Module, *, pixel_mean: Sequence[float] | None = None,
                    pixel_std: Sequence[float] | None = None, **kwargs: Any) -> nn.Module:
    """`kwargs` are the objective's own typed keyword arguments (`train.objective_kwargs`).
    `pixel_mean`/`pixel_std`, the data's normalisation, reach the objectives that look at pixels
    (`reads_pixels = True`), so that they always agree with `data.mean`/`data.std`."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    if getattr(cls, "reads_pixels", False) and pixel_mean is not None and pixel_std is not None:
        kwargs = {**kwargs, "pixel_mean": tuple(pixel_mean), "pixel_std": tuple(pixel_std)}
    try:
        return cls(backbone, **kwargs)
    except TypeError as err:
        raise TypeError(f"train.objective_kwargs do not fit objective {name!r}: {err}") from None
