"""Few-shot ridge evaluation (big_vision's fewshot_lsr) of the backbone, on a gathered fp32 copy on rank 0."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from pretrain.config import FewshotHookConfig
from pretrain.engine.deepspeed_engine import BACKBONE, eval_copy
from pretrain.evaluation.common import Evaluator, register
from pretrain.tracking.tracker import NullTracker


@register("fewshot")
class Fewshot(Evaluator):
    """`fewshot/<data>/<k>shot[/seed<i>|/std]` and `fewshot/l2` (rank 0; the other ranks help gather)."""

    def __init__(self, fewshot: FewshotHookConfig, *, build_backbone: Callable[[], nn.Module], is_main: bool,
                 image_size: int, mean, std, **cadence):
        super().__init__(**cadence)
        self.fewshot, self.build_backbone, self.is_main = fewshot, build_backbone, is_main
        self.image_size, self.mean, self.std = image_size, mean, std

    def run(self, ds_engine, *, step, final, tracker) -> dict[str, float]:
        from pretrain.tasks.fewshot import evaluate_fewshot, log_fewshot, parse_datasets

        backbone = eval_copy(getattr(ds_engine.module, BACKBONE), self.build_backbone, is_main=self.is_main, device=ds_engine.device)
        if backbone is None:
            return {}
        f = self.fewshot
        roots = parse_datasets(f.datasets, f.data_root)
        results = evaluate_fewshot(
            backbone, datasets=list(roots), data_root=roots, image_size=self.image_size, mean=self.mean, std=self.std,
            shots=f.shots, seeds=f.seeds, l2=f.l2, max_train_per_class=f.max_train_per_class, max_test=f.max_test,
            batch_size=f.batch_size,
        )
        return log_fewshot(NullTracker(), results)  # names the metrics; the trainer logs them
