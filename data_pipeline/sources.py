"""Readers of the image collections users convert into shards; each yields `Sample`s."""
from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data_pipeline.sample import Sample

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _read_idx(path: Path) -> np.ndarray:
    """IDX format (LeCun's MNIST files), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (expected magic 0x0000 08 nd)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def fashion_mnist(root: str | Path, split: str = "train", limit: int | None = None) -> Iterator[Sample]:
    """Fashion-MNIST IDX files (`train-images-idx3-ubyte.gz` ...), pixels stored as PNG."""
    root = Path(root)
    prefix = {"train": "train", "test": "t10k"}[split]
    found = {}
    for kind, name in (("images", "idx3"), ("labels", "idx1")):
        candidates = [root / f"{prefix}-{kind}-{name}-ubyte{ext}" for ext in (".gz", "")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"no Fashion-MNIST {kind} for split {split!r} in {root} (expected {candidates[0].name}); "
                "Debian's dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist"
            )
        found[kind] = _read_idx(path)
    images, labels = found["images"], found["labels"]
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels for split {split!r}")
    n = len(images) if limit is None else min(limit, len(images))
    for i in range(n):
        yield Sample(key=f"fmnist_{split}_{i:06d}", image=png_bytes(images[i]), ext="png", label=int(labels[i]))
