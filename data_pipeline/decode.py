"""Turn raw shard samples into training batches, inside the loader workers.

Per sample, `ImagePipeline` decodes and augments (timm's random-resized-crop parameters,
flip, RandAugment) into a uint8 array; per batch, `BatchFinisher` normalises with the
model's mean/std and applies timm's mixup/cutmix (soft targets). Bad samples raise
`BadSample` with a reason the stream counts.

Fast JPEG path: the crop box is drawn from the image header before any pixel is decoded,
then the JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8: PIL `draft`) that still
leaves the crop at least the output size, and the crop is resized straight from that
reduced image. `tests/data_pipeline/test_decode.py` bounds its difference to the slow path
(full decode, then crop and resize).
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import Mixup
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from data_pipeline.sample import BadSample, decode_image, image_field, sample_labels, where

__all__ = ["BadSample", "BatchFinisher", "ClassificationDecoder", "ImagePipeline", "SampleDecoder", "build_mixup", "build_transform"]

INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
Augment = Literal["none", "center", "flip", "inception"]


def build_transform(image_size: int, augment: str, mean, std) -> T.Compose:
    """PIL image -> normalised tensor, for code that holds decoded images (transfer, features)."""
    ops: list = []
    if augment == "inception":
        ops.append(T.RandomResizedCrop(image_size, antialias=True))
    else:
        ops.append(T.Resize((image_size, image_size), antialias=True))
    if augment in ("flip", "inception"):
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def seed_sample(seed: int) -> None:
    """Seed every generator augmentations draw from (timm uses `random` and numpy, torchvision torch)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def crop_box(img: Image.Image, augment: Augment, *, scale, ratio, crop_pct: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the region that becomes the output, in source pixels.
    `img` may be freshly opened: only its size (from the header) is read."""
    width, height = img.size
    if augment == "inception":
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(img, scale, ratio)
        return left, top, left + w, top + h
    if augment == "center":
        side = min(width, height) * crop_pct
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side
    return 0.0, 0.0, float(width), float(height)


@dataclass
class ImagePipeline:
    """Encoded bytes -> (image_size, image_size, 3) uint8 array, augmented. Picklable."""

    image_size: int
    augment: Augment = "none"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    randaugment: str | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # RandAugment fills with the mean colour
    fast_jpeg: bool = True

    def __post_init__(self):
        self._randaugment = None
        if self.randaugment:
            hparams = {"translate_const": int(self.image_size * 0.45), "img_mean": tuple(round(255 * m) for m in self.mean)}
            self._randaugment = rand_augment_transform(self.randaugment, hparams)

    def __call__(self, data: bytes, where: str) -> np.ndarray:
        out = (self.image_size, self.image_size)
        try:
            img = Image.open(io.BytesIO(data))
            box = crop_box(img, self.augment, scale=self.scale, ratio=self.ratio, crop_pct=self.crop_pct)
            if self.fast_jpeg and img.format == "JPEG":
                box = _draft(img, box, out)
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
            img = img.resize(out, INTERPOLATION[self.interpolation], box=box)
        except Exception as err:  # PIL raises many types for broken bytes
            raise BadSample("undecodable", f"{where}: {err}") from None
        if self.augment in ("flip", "inception") and random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self._randaugment is not None:
            img = self._randaugment(img)
        return np.asarray(img)


def _draft(img: Image.Image, box: tuple[float, float, float, float], out: tuple[int, int]) -> tuple[float, ...]:
    """Ask libjpeg to decode at 1/2, 1/4 or 1/8 scale when the crop stays >= `out`; the box in the smaller image."""
    width, height = img.size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    drafted = img.draft("RGB", (math.ceil(width * out[0] / crop_w), math.ceil(height * out[1] / crop_h)))
    if drafted is None or img.size == (width, height):
        return box
    scale = width / drafted[1][2]  # draft reports the full image's extent in the reduced one
    left, top, right, bottom = (v / scale for v in box)
    return left, top, min(right, img.size[0]), min(bottom, img.size[1])


@dataclass
class SampleDecoder:
    """Picklable, so DataLoader workers get their own copy. `transform` maps the decoded
    PIL image (classification uses `ClassificationDecoder`; other tasks subclass)."""

    transform: object
    num_classes: int
    label_mode: Literal["single", "multi", "none"] = "single"

    def image(self, sample: dict) -> Image.Image:
        return decode_image(sample)

    def target(self, sample: dict) -> torch.Tensor:
        if self.label_mode == "none":  # self-supervised: labels, if any, are ignored
            return torch.tensor(-1)
        labels = sample_labels(sample, self.num_classes)
        if self.label_mode == "single":
            return torch.tensor(labels[0])
        target = torch.zeros(self.num_classes)
        target[labels] = 1.0
        return target

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        target = self.target(sample)
        return self.transform(self.image(sample)), target


@dataclass
class ClassificationDecoder(SampleDecoder):
    """Raw sample -> (uint8 HWC array from `pipeline`, target); batches go to `BatchFinisher`."""

    pipeline: ImagePipeline | None = None

    def __call__(self, sample: dict) -> tuple[np.ndarray, torch.Tensor]:
        target = self.target(sample)  # labels first: a bad label costs no decode
        return self.pipeline(sample[image_field(sample)], where(sample)), target


@dataclass
class BatchFinisher:
    """uint8 images and targets of one batch -> normalised float NCHW batch and targets,
    with mixup/cutmix when configured (in the worker, on the whole batch)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mixup: Mixup | None = None

    def __post_init__(self):
        # x / 255 - mean) / std as one multiply-add per element
        self._scale = (1.0 / (255.0 * torch.tensor(self.std))).view(1, 3, 1, 1)
        self._shift = (-torch.tensor(self.mean) / torch.tensor(self.std)).view(1, 3, 1, 1)

    def __call__(self, images: list[np.ndarray], targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        batch = torch.empty(pixels.shape, dtype=torch.float32)
        torch.addcmul(self._shift, pixels, self._scale, out=batch)
        target = torch.stack(targets)
        if self.mixup is not None:
            batch, target = self.mixup(batch, target)
        return batch, target


def build_mixup(*, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float, label_smoothing: float,
                num_classes: int, multi_label: bool) -> Mixup | None:
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                 label_smoothing=label_smoothing, num_classes=num_classes, multi_label=multi_label)
