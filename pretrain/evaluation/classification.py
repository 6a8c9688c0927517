"""Top-1 and mean per-class accuracy of the backbone on a labelled data set (fine-tuning's test score)."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pretrain.datasets import LabeledImages
from pretrain.engine.deepspeed_engine import BACKBONE, to_device
from pretrain.evaluation.common import Evaluator, lockstep, register


@register("classification")
class Classification(Evaluator):
    """Each rank scores a strided share of `data`; the per-class counts are summed over ranks."""

    def __init__(self, data: LabeledImages, *, batch_size: int, rank: int, world_size: int, **cadence):
        super().__init__(**cadence)
        self.data, self.batch_size, self.rank, self.world_size = data, batch_size, rank, world_size

    @torch.no_grad()
    def run(self, ds_engine, *, step, final, tracker) -> dict[str, float]:
        model = getattr(ds_engine.module, BACKBONE)
        was_training = model.training
        model.eval()
        num_classes = self.data.num_classes
        correct = torch.zeros(num_classes, dtype=torch.float64)
        total = torch.zeros(num_classes, dtype=torch.float64)
        share = self.data.subset(np.arange(self.rank, len(self.data), self.world_size))
        batches = DataLoader(share, batch_size=self.batch_size)
        for (images, labels), real in lockstep(batches, sync=ds_engine.zero_optimization_partition_weights(),
                                               device=ds_engine.device):
            pred = model(to_device(ds_engine, images, labels)[0]).argmax(-1).cpu()
            if real:
                total += torch.bincount(labels, minlength=num_classes)
                correct += torch.bincount(labels[pred == labels], minlength=num_classes)
        model.train(was_training)
        dist.all_reduce(correct)
        dist.all_reduce(total)
        seen = total > 0
        return {"top1": (correct.sum() / total.sum()).item(), "mean_per_class": (correct[seen] / total[seen]).mean().item()}
