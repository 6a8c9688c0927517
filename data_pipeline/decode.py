"""Turn raw shard samples into training batches, inside the loader workers.

Per sample, `ImagePipeline` decodes and augments (timm's random-resized-crop parameters,
flip, RandAugment) into a uint8 array; per batch, `BatchFinisher` stacks them into a uint8
batch and applies timm's mixup/cutmix (soft targets); `normalize_batch` normalises with the
model's mean/std on the device, after the copy. Bad samples raise `BadSample` with a reason
the stream counts.

Fast path (`fast_jpeg`): the crop box is drawn from the image header before any pixel is
decoded. A JPEG whose crop allows it is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (PIL
`draft`), as long as the crop stays at least the output size, and Pillow resizes the
crop's exact (fractional) box from that reduced image. Otherwise only the crop is copied
out and resized by torch's antialiased uint8 kernel (vectorised: about 4x Pillow's
resize). The slow path is what torchvision/timm do: Pillow decodes all, then crops and
resizes. `tests/data_pipeline/test_decode.py` bounds the difference between the two.
"""
from __future__ import annotations

import ctypes
import io
import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import FastCollateMixup
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import get_worker_info
from torchvision import transforms as T

from data_pipeline.sample import BadSample, decode_image, image_field, sample_labels, where

__all__ = ["BadSample", "BatchFinisher", "ClassificationDecoder", "ImagePipeline", "SampleDecoder", "build_mixup", "build_transform",
           "normalize_batch"]

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
    """Seed every generator augmentations draw from (timm uses `random` and numpy, torchvision
    torch's CPU generator; `torch.manual_seed` would also seed lazily every GPU backend, ~1 ms)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)


def keep_freed_buffers() -> None:
    """Make a loader process reuse freed image and batch buffers instead of returning them to
    the OS: fresh pages cost a page fault each, and in VMs (Firecracker, gVisor) those cost
    5-7 us, so a fresh float batch costs about a third of its decoding. Pillow keeps freed
    blocks (PILLOW_BLOCKS_MAX); glibc serves every size from its heap, where freed batches
    are reused (glibc cannot raise its mmap threshold past 32 MB, a batch of 64 at 224 px)."""
    Image.core.set_blocks_max(max(Image.core.get_blocks_max(), 64))
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap per allocation
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep freed heap for the next batch
    except (OSError, AttributeError):  # not glibc: allocation stays as it is
        pass


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
        """(size, size, 3) uint8; timm's order: random resized crop, flip, RandAugment."""
        out = (self.image_size, self.image_size)
        try:
            img = Image.open(io.BytesIO(data))
            box = crop_box(img, self.augment, scale=self.scale, ratio=self.ratio, crop_pct=self.crop_pct)
            # drawn as torchvision's RandomHorizontalFlip does: runs keep their flips across versions
            flip = self.augment in ("flip", "inception") and torch.rand(1).item() < 0.5
            pixels = self._fast(img, box, out, flip) if self.fast_jpeg else self._slow(img, box, out, flip)
        except Exception as err:  # PIL and libjpeg raise many types for broken bytes
            raise BadSample("undecodable", f"{where}: {err}") from None
        if self._randaugment is not None:
            pixels = np.asarray(self._randaugment(Image.fromarray(pixels)))
        return pixels

    def _resize_pil(self, img: Image.Image, box, out, flip: bool) -> np.ndarray:
        img = img.resize(out, INTERPOLATION[self.interpolation], box=box)
        return np.asarray(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img)

    def _slow(self, img: Image.Image, box, out, flip: bool) -> np.ndarray:
        img.load()
        return self._resize_pil(img.convert("RGB"), box, out, flip)

    def _fast(self, img: Image.Image, box, out, flip: bool) -> np.ndarray:
        full_size = img.size
        if img.format == "JPEG":
            box = _draft(img, box, out)
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != full_size:  # drafted: the box is fractional in the reduced image, which Pillow resizes exactly
            return self._resize_pil(img, box, out, flip)
        left, top = round(box[0]), round(box[1])  # whole pixels already, except a centre crop's half pixel
        right, bottom = max(left + 1, round(box[2])), max(top + 1, round(box[3]))
        pixels = torch.frombuffer(bytearray(img.crop((left, top, right, bottom)).tobytes()), dtype=torch.uint8)
        crop = pixels.view(1, bottom - top, right - left, 3).permute(0, 3, 1, 2)  # HWC is channels-last NCHW
        resized = F.interpolate(crop, size=out, mode=self.interpolation, antialias=True)
        if flip:
            resized = resized.flip(-1)
        return resized[0].permute(1, 2, 0).numpy()


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
    """Picklable, so DataLoader workers get their own copy. The base decodes a sample's image;
    each task subclasses it with its `target` and `__call__` (classification:
    `ClassificationDecoder`), using `transform` on the decoded PIL image where it needs one."""

    transform: object
    num_classes: int
    label_mode: Literal["single", "multi", "none"] = "single"

    def image(self, sample: dict) -> Image.Image:
        return decode_image(sample)


@dataclass
class ClassificationDecoder(SampleDecoder):
    """Raw sample -> (uint8 HWC array from `pipeline`, target); batches go to `BatchFinisher`."""

    pipeline: ImagePipeline | None = None

    def target(self, sample: dict) -> int | np.ndarray:
        """A class index (single), a float32 multi-hot vector (multi) or -1 (none); the batch
        finisher makes one tensor of them (a tensor per sample costs more than its decode step)."""
        if self.label_mode == "none":
            return -1
        labels = sample_labels(sample, self.num_classes)
        if self.label_mode == "single":
            return labels[0]
        hot = np.zeros(self.num_classes, dtype=np.float32)
        hot[labels] = 1.0
        return hot

    def __call__(self, sample: dict) -> tuple[np.ndarray, int | np.ndarray]:
        target = self.target(sample)  # labels first: a bad label costs no decode
        return self.pipeline(sample[image_field(sample)], where(sample)), target


@dataclass
class BatchFinisher:
    """uint8 HWC images and targets of one batch -> a (B, 3, H, W) batch and its targets, in the
    loader worker, with mixup/cutmix when configured.

    `host_dtype="uint8"` (the default): the batch stays uint8, a quarter of float32's bytes through
    the worker queue and the host-to-device copy; `normalize_batch` makes it float on the device.
    Mixup/cutmix then blend the uint8 pixels, rounded to whole levels, as timm's
    `FastCollateMixup` does for its GPU prefetcher: the draws stay in the worker, seeded by the
    batch's place in the epoch, so a resumed run mixes exactly as an uninterrupted one.
    `host_dtype="float32"`: normalised here, for CPU training (workers share the arithmetic).

    Without mixup the batch is (B, 3, H, W) in channels_last memory, a view of the stacked HWC
    pixels (normalising them row by row needs no transposition either); models and `.to()`
    accept it as any NCHW tensor.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mixup: FastCollateMixup | None = None
    host_dtype: Literal["uint8", "float32"] = "uint8"

    def __call__(self, images: list[np.ndarray], targets: list) -> tuple[torch.Tensor, torch.Tensor]:
        target = torch.from_numpy(np.array(targets))
        if self.mixup is not None:
            batch, target = self.mixup([(image.transpose(2, 0, 1), t) for image, t in zip(images, targets)])
        else:
            shape = (len(images), *images[0].shape)
            pixels = np.empty(shape, dtype=np.uint8) if self.host_dtype == "float32" else _shared_uint8(shape)
            batch = torch.from_numpy(np.stack(images, out=pixels)).permute(0, 3, 1, 2)
        if self.host_dtype == "float32":
            batch = normalize_batch(batch, self.mean, self.std, device=torch.device("cpu"),
                                    out=_shared_empty(batch.shape, torch.float32))
        return batch, target


def normalize_batch(images: torch.Tensor, mean, std, *, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """A host batch as float32 `(pixels / 255 - mean) / std` on `device` (into `out` if given). A
    uint8 batch crosses from pinned memory without blocking the host (CUDA), and the arithmetic
    runs on the device (timm's PrefetchLoader does the same); a float batch is only moved."""
    if images.dtype != torch.uint8:
        return images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.pin_memory().to(device, non_blocking=True)
    b, c, h, w = images.shape
    mean, std = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    if not images.is_contiguous(memory_format=torch.channels_last):  # mixup's NCHW
        return torch.addcmul(shift.view(1, c, 1, 1), images, scale.view(1, c, 1, 1), out=out)
    # channels_last: rows of w x (r, g, b) pixels, normalised without a transposition (which
    # costs a quarter of a sample's decoding on a CPU); the result is channels_last too
    rows = images.permute(0, 2, 3, 1).reshape(b * h, w * c)
    out = out.view(b * h, w * c) if out is not None else None
    return torch.addcmul(shift.repeat(w), rows, scale.repeat(w), out=out).view(b, h, w, c).permute(0, 3, 1, 2)


def _shared_uint8(shape: tuple[int, ...]) -> np.ndarray:
    return _shared_empty(shape, torch.uint8).numpy()


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a loader worker it is allocated in shared memory, so handing
    the batch to the main process copies nothing (as DataLoader's own collate does, through the
    same storage call)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.tensor([], dtype=dtype).set_(storage, 0, shape)


def build_mixup(*, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float, label_smoothing: float,
                num_classes: int, multi_label: bool) -> FastCollateMixup | None:
    """timm's uint8 batch mixup for these settings; None when mixup and cutmix are both off."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return FastCollateMixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                 label_smoothing=label_smoothing, num_classes=num_classes, multi_label=multi_label)
