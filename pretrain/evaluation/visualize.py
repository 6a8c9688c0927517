"""A PNG of what the objective sees and predicts on a fixed batch (objectives with `visualize(images)`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from pretrain.engine.deepspeed_engine import eval_copy
from pretrain.evaluation.common import Evaluator, register


@register("visualize")
class Visualize(Evaluator):
    """`<output_dir>/visualize/step<N>.png`, logged as an artifact (rank 0; the other ranks help gather)."""

    def __init__(self, images: torch.Tensor | None, *, build_objective: Callable[[], nn.Module], output_dir: str | Path,
                 is_main: bool, **cadence):
        super().__init__(**cadence)
        self.images, self.build_objective, self.is_main = images, build_objective, is_main
        self.output_dir = Path(output_dir)

    def run(self, ds_engine, *, step, final, tracker) -> dict[str, float]:
        copy = eval_copy(ds_engine.module, self.build_objective, is_main=self.is_main, device=ds_engine.device)
        if copy is not None:
            path = self.output_dir / "visualize" / f"step{step:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            copy.visualize(self.images.to(ds_engine.device)).save(path)
            tracker.log_artifact(path, "visualize")
        return {}
