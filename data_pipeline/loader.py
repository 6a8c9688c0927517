"""Build a rank's data stream from the typed `data:` section."""
from __future__ import annotations

from data_pipeline.config import DataConfig
from data_pipeline.decode import SampleDecoder, build_transform
from data_pipeline.stream import ShardStream, StreamLoader, open_shard_set


def build_loader(data: DataConfig, *, rank: int, world_size: int, urls: str, train: bool) -> StreamLoader:
    """The stream of `urls` for this rank: training augmentation and shuffling when `train`."""
    decoder = SampleDecoder(
        build_transform(data.image_size, data.augment if train else "none", data.mean, data.std),
        num_classes=data.num_classes, label_mode=data.label_mode,
    )
    stream = ShardStream(
        open_shard_set(urls), decoder, batch_size=data.batch_size, rank=rank,
        world_size=world_size, num_workers=data.num_workers, seed=data.seed,
        shuffle_buffer=data.shuffle_buffer if train else 1, max_bad_fraction=data.max_corrupt_fraction,
    )
    return StreamLoader(stream, num_workers=data.num_workers)
