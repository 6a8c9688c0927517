"""Learning-rate schedule: linear warmup, then linear or cosine decay (big_vision's shapes)."""
from __future__ import annotations

import math


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, decay: str, min_ratio: float = 0.0) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
