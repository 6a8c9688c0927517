"""Mean loss and metrics of the training objective over one pass of a validation stream."""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from data_pipeline.stream import StreamLoader
from pretrain.engine.deepspeed_engine import to_device
from pretrain.evaluation.common import Evaluator, lockstep, register


@register("validation")
class Validation(Evaluator):
    """`val_<metric>`: the objective's loss and metrics, averaged over every rank's samples."""

    def __init__(self, loader: StreamLoader, **cadence):
        super().__init__(**cadence)
        self.loader = loader

    @torch.no_grad()
    def run(self, ds_engine, *, step, final, tracker) -> dict[str, float]:
        ds_engine.eval()
        sums: dict[str, float] = {}
        count = 0
        batches = itertools.islice(self.loader, self.loader.stream.batches_per_epoch())
        for (images, targets), real in lockstep(batches, sync=ds_engine.zero_optimization_partition_weights(),
                                                device=ds_engine.device):
            loss, metrics = ds_engine(*to_device(ds_engine, images, targets))
            if real:
                for key, value in {"loss": loss, **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + value.float().item() * len(images)
                count += len(images)
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64)
        dist.all_reduce(totals)
        ds_engine.train()
        return {f"val_{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}
