"""Training-data throughput per CPU core: our shard stream against timm's WebDataset loader
and against the cost of decoding the JPEGs alone.

The photos are real: JPEG patches (224-300 px, quality 90) cut and rescaled from
scikit-learn's two sample photographs (no download), written as shards once. Each loader
produces the same training batches: random-resized crop to 224 px (bilinear), horizontal
flip, ImageNet normalisation, float32 NCHW. Everything runs in one process with one torch
thread (num_workers=0). Per core = samples per second of this process's CPU time
(`time.process_time`), which other programs on a shared machine disturb far less than
wall-clock time (also printed). Loaders are timed in turns, `--repeats` times, over the
whole epoch, and the medians are reported. All rows run with the allocator settings our
loader workers use (`keep_freed_buffers`), so none pays page faults the others do not.

    python bench/data_throughput.py [--images 1024] [--repeats 5]

Rows:
  decode_limit  PIL: open + decode + convert RGB + resize to 224x224 of each JPEG, nothing
                else (no tar reading, crop choice, flip, tensors or batching): the limit
  timm_wds      timm.data.create_dataset('wds/...') + create_loader (the same augmentation,
                colour jitter off), use_prefetcher False and True (normalising in the main
                process on the CPU); the faster is the baseline
  ours          data_pipeline.loader.build_loader (shuffle buffer 256, fast JPEG path on), with
                the cross-shard order on: each block draws from every shard at once
                (data.interleave_shards, default 256; the shards here are 16 of 64 images)
  ours_one_lane the same with data.interleave_shards=1: the order before it (one shard at a time)

  host_float32  ours with one worker process, batches handed over normalised (data.host_dtype float32)
  host_uint8    the same handing over uint8 (the default), normalised after the hand-over; both
                report wall-clock samples/s (the work is split over two processes)

Last line: RESULT ours_vs_timm=<ours / best timm> ours_vs_decode_limit=<ours / limit>
ours_vs_one_lane=<ours / ours_one_lane> host_bytes_ratio=<bytes per batch through the worker
queue, uint8 / float32> host_uint8_vs_float32=<wall samples/s, uint8 / float32>
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.decode import keep_freed_buffers, normalize_batch  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.sample import Sample  # noqa: E402
from data_pipeline.writer import write_split  # noqa: E402

SIZE = 224
BATCH = 64
PER_SHARD = 64  # 16 shards, so that the cross-shard order has lanes to read side by side


def photo_patches(n: int, seed: int = 0) -> list[bytes]:
    folder = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]) / "datasets" / "images"
    photos = [Image.open(folder / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % 2]
        side = int(rng.integers(160, min(photo.size) + 1))
        aspect = float(rng.uniform(0.8, 1.25))
        w, h = min(photo.size[0], int(side * aspect)), min(photo.size[1], side)
        x, y = int(rng.integers(0, photo.size[0] - w + 1)), int(rng.integers(0, photo.size[1] - h + 1))
        target = int(rng.integers(224, 301))
        scale = target / max(w, h)
        patch = photo.crop((x, y, x + w, y + h)).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        patch.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode_limit(jpegs: list[bytes]) -> int:
    for data in jpegs:
        Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return len(jpegs)


def timm_epoch(root: str, prefetcher: bool) -> int:
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("wds/bench", root=root, split="train", is_training=True, batch_size=BATCH, seed=0)
    loader = create_loader(
        dataset, input_size=(3, SIZE, SIZE), batch_size=BATCH, is_training=True, color_jitter=None, interpolation="bilinear",
        num_workers=0, use_prefetcher=prefetcher, device=torch.device("cpu"), persistent_workers=False,
    )
    seen = 0
    for images, _ in loader:
        assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.float32
        seen += len(images)
    return seen


def ours_epoch(pattern: str, epoch: int, **order) -> int:
    """One epoch of our loader; `order`: data.interleave_shards to override the default."""
    cfg = DataConfig(train_urls=pattern, batch_size=BATCH, num_workers=0, shuffle_buffer=256, image_size=SIZE,
                     num_classes=2, augment="inception", normalize="imagenet", seed=epoch + 1, **order)
    loader = build_loader(cfg, rank=0, world_size=1, urls=pattern, train=True)
    seen = 0
    for images, _ in itertools.islice(iter(loader), loader.stream.batches_per_epoch()):
        assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.float32
        seen += len(images)
    return seen


HOST_BYTES: dict[str, int] = {}  # host_dtype -> bytes per batch through the worker queue


def host_epoch(pattern: str, epoch: int, host_dtype: str) -> int:
    """One epoch of our loader with one worker process, the batches handed over as `host_dtype`
    (uint8: normalised after the hand-over, here on the CPU as the device; float32: in the
    worker); records the bytes per batch that cross the worker boundary in HOST_BYTES."""
    cfg = DataConfig(train_urls=pattern, batch_size=BATCH, num_workers=1, shuffle_buffer=256, image_size=SIZE,
                     num_classes=2, augment="inception", normalize="imagenet", seed=epoch + 1, host_dtype=host_dtype)
    loader = build_loader(cfg, rank=0, world_size=1, urls=pattern, train=True, device=torch.device("cpu"))
    seen, crossed = 0, 0
    for images, targets in itertools.islice(loader.host_batches(), loader.stream.batches_per_epoch()):
        crossed += images.untyped_storage().nbytes() + targets.untyped_storage().nbytes()
        images = normalize_batch(images, cfg.mean, cfg.std, device=torch.device("cpu"))
        assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.float32
        seen += len(images)
    HOST_BYTES[host_dtype] = crossed // loader.stream.batches_per_epoch()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="JPEG patches in the shards (a multiple of 64)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_buffers()
    jpegs = photo_patches(args.images)
    print(f"{len(jpegs)} JPEG patches, mean {np.mean([len(j) for j in jpegs]) / 1e3:.1f} kB, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as root:
        write_split((Sample(f"img_{i:06d}", data, "jpg", i % 2) for i, data in enumerate(jpegs)), root,
                    prefix="train", samples_per_shard=PER_SHARD)
        pattern = f"{root}/train-{{000000..{(len(jpegs) - 1) // PER_SHARD:06d}}}.tar"
        runs = {
            "decode_limit": lambda r: decode_limit(jpegs),
            "timm_wds": lambda r: timm_epoch(root, prefetcher=False),
            "timm_wds_prefetcher": lambda r: timm_epoch(root, prefetcher=True),
            "ours": lambda r: ours_epoch(pattern, r),
            "ours_one_lane": lambda r: ours_epoch(pattern, r, interleave_shards=1),
            "host_float32": lambda r: host_epoch(pattern, r, "float32"),  # wall clock: a worker process
            "host_uint8": lambda r: host_epoch(pattern, r, "uint8"),
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        wall: dict[str, list[float]] = {name: [] for name in runs}
        for name, run in runs.items():  # warm-up: imports, first-touch caches
            run(-1)
        for r in range(args.repeats):
            for name, run in runs.items():
                cpu, start = time.process_time(), time.perf_counter()
                n = run(r)
                rates[name].append(n / (time.process_time() - cpu))
                wall[name].append(n / (time.perf_counter() - start))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{'loader':<22}{'samples/s/core (median)':>25}{'min':>9}{'max':>9}{'wall samples/s':>16}")
    for name, values in rates.items():
        print(f"{name:<22}{median[name]:>25.1f}{min(values):>9.1f}{max(values):>9.1f}{statistics.median(wall[name]):>16.1f}")
    timm_best = max(median["timm_wds"], median["timm_wds_prefetcher"])
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"RESULT ours_vs_timm={median['ours'] / timm_best:.2f} ours_vs_decode_limit={median['ours'] / median['decode_limit']:.2f} "
          f"ours_vs_one_lane={median['ours'] / median['ours_one_lane']:.2f} "
          f"host_bytes_ratio={HOST_BYTES['uint8'] / HOST_BYTES['float32']:.3f} "
          f"host_uint8_vs_float32={statistics.median(wall['host_uint8']) / statistics.median(wall['host_float32']):.2f}")


if __name__ == "__main__":
    main()
