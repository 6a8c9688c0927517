"""Detection data: COCO JSON + image folder, or WebDataset shards with a `json` boxes field.

Every source yields `(image, packed)` where `packed` is a fixed-shape (max_objects + 1, 5)
tensor, so batches stack and the project's exact, resumable shard stream carries them:
  row 0         [num_objects, original width, original height, 0, 0]
  rows 1..n     [class, cx, cy, w, h], box normalised to [0, 1]
`unpack_targets` turns a batch back into DETR's list of {"labels", "boxes"} dicts.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from torchvision.datasets import CocoDetection
from torchvision.ops import box_convert
from torchvision.transforms import functional as TF

from data_pipeline.decode import BadSample, SampleDecoder
from data_pipeline.shards import iter_tar_samples
from data_pipeline.storage import expand_urls, open_url
from data_pipeline.stream import ShardStream, StreamLoader, open_shard_set
from pretrain.tasks.detection.config import CocoSource, ShapesSource, ShardSource

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- packed targets

def pack_target(labels: torch.Tensor, boxes: torch.Tensor, *, width: int, height: int, max_objects: int) -> torch.Tensor:
    """Labels (n,) and normalised cxcywh boxes (n, 4) -> (max_objects + 1, 5); extra boxes are dropped."""
    n = min(len(labels), max_objects)
    packed = torch.zeros(max_objects + 1, 5)
    packed[0, :3] = torch.tensor([n, width, height], dtype=torch.float32)
    packed[1 : n + 1, 0] = labels[:n].float()
    packed[1 : n + 1, 1:] = boxes[:n].float()
    return packed


def unpack_targets(packed: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """(B, max_objects + 1, 5) -> per image {"labels" (n,), "boxes" (n, 4), "size" (w, h)}."""
    out = []
    for item in packed:
        n = int(item[0, 0])
        out.append({"labels": item[1 : n + 1, 0].long(), "boxes": item[1 : n + 1, 1:].float(), "size": item[0, 1:3].clone()})
    return out


# ---------------------------------------------------------------- image + boxes transform

@dataclass
class DetectionTransform:
    """Resize to a square (boxes are normalised, so they do not move), optional flip, normalise."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool = False

    def __call__(self, image: Image.Image, labels: torch.Tensor, boxes_xywh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`boxes_xywh` in pixels (COCO) -> (image tensor, labels, normalised cxcywh boxes)."""
        width, height = image.size
        xyxy = box_convert(boxes_xywh, "xywh", "xyxy") / torch.tensor([width, height, width, height], dtype=torch.float32)
        xyxy = xyxy.clamp(0, 1)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])  # boxes left empty by the clip go
        boxes = box_convert(xyxy[keep], "xyxy", "cxcywh")
        if image.size != (self.image_size, self.image_size):
            image = TF.resize(image, [self.image_size, self.image_size], antialias=True)
        tensor = TF.to_tensor(image)
        if self.hflip and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
            boxes[:, 0] = 1 - boxes[:, 0]
        return TF.normalize(tensor, self.mean, self.std), labels[keep], boxes


def _boxes_tensor(boxes, where: str) -> torch.Tensor:
    if len(boxes) == 0:
        return torch.zeros(0, 4)
    tensor = torch.as_tensor(boxes, dtype=torch.float32)  # ValueError on ragged lists
    if tensor.ndim != 2 or tensor.shape[-1] != 4 or not torch.isfinite(tensor).all():
        raise ValueError(f"{where}: boxes must be finite [x, y, w, h] lists, got {boxes!r}")
    return tensor


# ---------------------------------------------------------------- COCO JSON + image folder

class CocoBoxes:
    """torchvision's CocoDetection `transforms=`: COCO annotations -> (image, packed target).

    Category ids are mapped to 0..K-1 in sorted order; crowd regions are not trained on.
    """

    def __init__(self, category_ids: list[int], transform: DetectionTransform, max_objects: int):
        self.index = {cid: i for i, cid in enumerate(sorted(category_ids))}
        self.transform, self.max_objects = transform, max_objects

    def __call__(self, image: Image.Image, annotations: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        anns = [a for a in annotations if not a.get("iscrowd", 0)]
        labels = torch.tensor([self.index[a["category_id"]] for a in anns], dtype=torch.long)
        boxes = _boxes_tensor([a["bbox"] for a in anns], f"image {annotations[0]['image_id'] if anns else '?'}")
        width, height = image.size
        tensor, labels, boxes = self.transform(image, labels, boxes)
        return tensor, pack_target(labels, boxes, width=width, height=height, max_objects=self.max_objects)


def coco_dataset(annotations: str | Path, images: str | Path, *, transform: DetectionTransform, num_classes: int, max_objects: int) -> CocoDetection:
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotations {annotations} not found (data.*.annotations)")
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} not found (data.*.images)")
    dataset = CocoDetection(str(images), str(annotations))
    cats = dataset.coco.getCatIds()
    if len(cats) != num_classes:
        raise ValueError(f"{annotations} has {len(cats)} categories but data.num_classes={num_classes}")
    dataset.transforms = CocoBoxes(cats, transform, max_objects)
    return dataset


# ---------------------------------------------------------------- WebDataset shards

@dataclass
class ShardBoxesDecoder(SampleDecoder):
    """A shard sample's image and `json` field `{"boxes": [[x, y, w, h], ...], "labels": [...]}`
    (pixels, COCO's convention) -> (image, packed target); bad samples raise `BadSample`."""

    max_objects: int = 50

    def target(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"{sample['__url__']}:{sample['__key__']}"
        if "json" not in sample:
            raise BadSample("no_boxes", f"{where} has no .json field of boxes")
        try:
            record = json.loads(sample["json"])
            labels = torch.tensor([int(c) for c in record["labels"]], dtype=torch.long)
            boxes = _boxes_tensor(record["boxes"], where)
        except (ValueError, TypeError, KeyError) as err:
            raise BadSample("bad_boxes", f"{where}: {err!r}; expected {{'boxes': [[x, y, w, h], ...], 'labels': [...]}}") from None
        if len(labels) != len(boxes) or any(not 0 <= c < self.num_classes for c in labels.tolist()):
            raise BadSample("bad_boxes", f"{where}: {len(boxes)} boxes, labels {labels.tolist()} (classes 0..{self.num_classes - 1})")
        return labels, boxes

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels, boxes = self.target(sample)
        image = self.image(sample)
        width, height = image.size
        tensor, labels, boxes = self.transform(image, labels, boxes)
        return tensor, pack_target(labels, boxes, width=width, height=height, max_objects=self.max_objects)


class ShardEvalSet(IterableDataset):
    """Every sample of the shards once, in order, this rank's share (i % world == rank)."""

    def __init__(self, urls: str, decode: Callable, *, rank: int, world_size: int):
        self.urls, self.decode, self.rank, self.world_size = expand_urls(urls), decode, rank, world_size
        if not self.urls:
            raise ValueError(f"data URL pattern {urls!r} names no shards")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = 0
        for url in self.urls:
            with open_url(url) as f:
                for sample in iter_tar_samples(f, url):
                    if index % self.world_size == self.rank:
                        try:
                            yield self.decode(sample)
                        except BadSample as err:
                            log.warning("skipping validation sample: %s", err)
                    index += 1


# ---------------------------------------------------------------- resumable batches of a map-style set

class MapBatches:
    """Infinite, resumable (images, packed) batches of a map-style data set: a seeded permutation
    per epoch, each rank an equal share of whole batches; the state is (epoch, batches taken).
    One DataLoader serves every epoch, so its workers start once."""

    def __init__(self, dataset: Dataset, *, batch_size: int, rank: int, world_size: int, num_workers: int, seed: int):
        self.dataset, self.batch_size, self.num_workers, self.seed = dataset, batch_size, num_workers, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = len(dataset) // world_size // batch_size * batch_size
        if self.per_rank == 0:
            raise ValueError(f"{len(dataset)} training images are fewer than one batch of {batch_size} on each of {world_size} ranks")
        self.epoch, self.taken = 0, 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, config has {self.seed}")
        self.epoch, self.taken = state["epoch"], state["taken"]

    def _indices(self) -> Iterator[int]:
        """This rank's sample indices from the current position on, epoch after epoch."""
        epoch, skip = self.epoch, self.taken * self.batch_size
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            yield from order[self.rank * self.per_rank + skip : (self.rank + 1) * self.per_rank].tolist()
            epoch, skip = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The loader reads ahead; the state counts only the batches handed out. Its own generator:
        # starting it draws no number from the training RNG (a resume starts it at another step).
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=_Sampler(self._indices),
                            num_workers=self.num_workers, drop_last=True, generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            self.taken += 1
            if self.taken * self.batch_size == self.per_rank:
                self.epoch, self.taken = self.epoch + 1, 0
            yield batch


@dataclass
class _Sampler:
    """An index stream as a DataLoader sampler (DataLoader only iterates it)."""

    indices: Callable[[], Iterator[int]]

    def __iter__(self) -> Iterator[int]:
        return self.indices()


# ---------------------------------------------------------------- sources by kind

def resolve_source(source, *, num_classes: int, is_main: bool):
    """A configured source, with the generated shapes set written (main rank first) and read as COCO."""
    if not isinstance(source, ShapesSource):
        return source
    from pretrain.tasks.detection.shapes import write_shapes

    root = Path(source.dir)
    if is_main:
        write_shapes(root, num_images=source.num_images, image_size=source.image_size, num_classes=num_classes,
                     max_objects=source.max_objects, seed=source.seed)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return CocoSource(annotations=str(root / "annotations.json"), images=str(root / "images"))


def source_class_names(source, num_classes: int) -> list[str]:
    """Category names of a COCO source in label order; "0", "1", ... for shards."""
    if isinstance(source, CocoSource) and Path(source.annotations).is_file():
        cats = sorted(json.loads(Path(source.annotations).read_text())["categories"], key=lambda c: c["id"])
        return [str(c.get("name", c["id"])) for c in cats]
    return [str(c) for c in range(num_classes)]


def _coco_train(source: CocoSource, decode: dict, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                seed: int, shuffle_buffer: int, max_bad_fraction: float) -> MapBatches:
    dataset = coco_dataset(source.annotations, source.images, **decode)
    return MapBatches(dataset, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed)


def _coco_eval(source: CocoSource, decode: dict, *, batch_size: int, rank: int, world_size: int, num_workers: int) -> DataLoader:
    dataset = coco_dataset(source.annotations, source.images, **decode)
    return DataLoader(Subset(dataset, list(range(rank, len(dataset), world_size))), batch_size=batch_size, num_workers=num_workers)


def _shard_train(source: ShardSource, decode: dict, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int, shuffle_buffer: int, max_bad_fraction: float) -> StreamLoader:
    stream = ShardStream(open_shard_set(source.urls), ShardBoxesDecoder(**decode), batch_size=batch_size, rank=rank,
                         world_size=world_size, num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer,
                         max_bad_fraction=max_bad_fraction)
    return StreamLoader(stream, num_workers)


def _shard_eval(source: ShardSource, decode: dict, *, batch_size: int, rank: int, world_size: int, num_workers: int) -> DataLoader:
    dataset = ShardEvalSet(source.urls, ShardBoxesDecoder(**decode), rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, num_workers=0)  # one reader keeps the order


# kind -> (resumable infinite training batches, one pass of this rank's validation share)
SOURCES: dict[str, tuple[Callable, Callable]] = {"coco": (_coco_train, _coco_eval), "wds": (_shard_train, _shard_eval)}


def train_batches(source, *, transform: DetectionTransform, num_classes: int, max_objects: int, **loader):
    """Infinite (images, packed) batches with state_dict/load_state_dict, of a resolved source."""
    decode = dict(transform=transform, num_classes=num_classes, max_objects=max_objects)
    return SOURCES[source.kind][0](source, decode, **loader)


def eval_loader(source, *, transform: DetectionTransform, num_classes: int, max_objects: int, **loader) -> DataLoader:
    """One pass over this rank's share of a resolved source's images."""
    decode = dict(transform=transform, num_classes=num_classes, max_objects=max_objects)
    return SOURCES[source.kind][1](source, decode, **loader)
