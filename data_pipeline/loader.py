"""Build a rank's data stream from the typed `data:` section."""
from __future__ import annotations

from typing import Iterator

import torch

from data_pipeline.config import DataConfig
from data_pipeline.decode import BatchFinisher, ClassificationDecoder, ImagePipeline, build_mixup, normalize_batch
from data_pipeline.stream import ShardStream, StreamLoader, open_shard_set


class DeviceLoader(StreamLoader):
    """The stream's host batches (uint8 by default) normalised on `device` after the copy; its
    state, resume and bad-sample counts are the StreamLoader's."""

    def __init__(self, stream: ShardStream, *, num_workers: int, mean, std, device: torch.device):
        super().__init__(stream, num_workers=num_workers)
        self.mean, self.std, self.device = mean, std, device

    def host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches as the workers hand them over."""
        return super().__iter__()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets in self.host_batches():
            yield normalize_batch(images, self.mean, self.std, device=self.device), targets.to(self.device, non_blocking=True)


def default_device() -> torch.device:
    """The rank's accelerator (pretrain.engine.distributed sets the current CUDA device), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_loader(data: DataConfig, *, rank: int, world_size: int, urls: str, train: bool,
                 device: torch.device | None = None) -> DeviceLoader:
    """The stream of `urls` for this rank: training augmentation, mixup and shuffling when `train`;
    batches normalised on `device` (default: `default_device()`).

    Targets: class indices (label_mode single), multi-hot floats (multi), -1 (none); soft
    (batch, num_classes) float targets whenever mixup/cutmix is on in training.
    """
    if train:
        augment, crop_pct = data.augment, data.crop_pct
    else:
        augment, crop_pct = ("center", data.eval_crop_pct) if data.eval_crop_pct else ("none", data.crop_pct)
    pipeline = ImagePipeline(
        data.image_size, augment, scale=data.crop_scale, ratio=data.crop_ratio, crop_pct=crop_pct,
        interpolation=data.interpolation, randaugment=data.randaugment if train else None, mean=data.mean,
        fast_jpeg=data.fast_jpeg,
    )
    mixup = build_mixup(
        mixup_alpha=data.mixup_alpha, cutmix_alpha=data.cutmix_alpha, prob=data.mixup_prob, switch_prob=data.mixup_switch_prob,
        label_smoothing=data.label_smoothing, num_classes=data.num_classes, multi_label=data.label_mode == "multi",
    ) if train else None  # None too when mixup and cutmix are off
    stream = ShardStream(
        open_shard_set(urls),
        ClassificationDecoder(transform=None, num_classes=data.num_classes, label_mode=data.label_mode, pipeline=pipeline),
        batch_size=data.batch_size, rank=rank, world_size=world_size, num_workers=data.num_workers, seed=data.seed,
        shuffle_buffer=data.shuffle_buffer if train else 1, lanes=data.interleave_shards if train else 1,
        max_bad_fraction=data.max_corrupt_fraction,
        finish=BatchFinisher(data.mean, data.std, mixup, host_dtype=data.host_dtype),
    )
    return DeviceLoader(stream, num_workers=data.num_workers, mean=data.mean, std=data.std, device=device or default_device())
