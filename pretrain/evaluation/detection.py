"""COCO mAP of the detector over every rank's share of the validation set, and a PNG of its predictions."""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from pretrain.tasks.detection.evaluate import coco_map, gather_to_main, plot_predictions, predict
from pretrain.engine.deepspeed_engine import input_dtype
from pretrain.evaluation.common import Evaluator, register


@register("detection")
class DetectionMAP(Evaluator):
    """`val_map`, `val_map_50` (computed on rank 0, sent to all); after the last step also
    `<output_dir>/predictions/step<N>.png` of rank 0's first `plot_images` images."""

    def __init__(self, loader, *, num_classes: int, class_names: list[str], mean, std, plot_images: int,
                 score_threshold: float, output_dir: str | Path, is_main: bool, **cadence):
        super().__init__(**cadence)
        self.loader, self.num_classes, self.class_names, self.mean, self.std = loader, num_classes, class_names, mean, std
        self.plot_images, self.score_threshold, self.output_dir, self.is_main = plot_images, score_threshold, Path(output_dir), is_main

    def run(self, ds_engine, *, step, final, tracker) -> dict[str, float]:
        keep = self.plot_images if final else 0
        predictions, truths, images = predict(ds_engine.module.detector, self.loader, device=ds_engine.device,
                                              dtype=input_dtype(ds_engine), keep_images=keep,
                                              sync=ds_engine.zero_optimization_partition_weights(), progress=self.is_main)
        predictions, truths = gather_to_main(predictions), gather_to_main(truths)
        metrics = [coco_map(predictions, truths, self.num_classes) if self.is_main else None]
        dist.broadcast_object_list(metrics, src=0)
        if keep and self.is_main and len(images):
            png = plot_predictions(images, predictions[: len(images)], truths[: len(images)],
                                   self.output_dir / "predictions" / f"step{step:08d}.png", mean=self.mean, std=self.std,
                                   class_names=self.class_names, score_threshold=self.score_threshold)
            tracker.log_artifact(png, "predictions")
        return {f"val_{k}": v for k, v in metrics[0].items()}
