"""Turn a raw shard sample into (image tensor, target); bad samples raise `BadSample`."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torchvision import transforms as T

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


class BadSample(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def build_transform(image_size: int, augment: str, mean, std) -> T.Compose:
    """Train-time augmentation by name; evaluation uses augment='none'."""
    ops: list = []
    if augment == "inception":
        ops.append(T.RandomResizedCrop(image_size, antialias=True))
    else:
        ops.append(T.Resize((image_size, image_size), antialias=True))
    if augment in ("flip", "inception"):
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


@dataclass
class SampleDecoder:
    """Picklable, so DataLoader workers get their own copy."""

    transform: T.Compose
    num_classes: int
    label_mode: Literal["single", "multi", "none"] = "single"

    def image(self, sample: dict) -> Image.Image:
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        if field is None:
            raise BadSample("no_image", f"{sample['__url__']}:{sample['__key__']} has no image field")
        try:
            img = Image.open(io.BytesIO(sample[field]))
            img.load()
            return img.convert("RGB")
        except Exception as err:  # PIL raises many types for broken bytes
            raise BadSample("undecodable", f"{sample['__url__']}:{sample['__key__']}: {err}") from None

    def target(self, sample: dict) -> torch.Tensor:
        if self.label_mode == "none":  # self-supervised: labels, if any, are ignored
            return torch.tensor(-1)
        where = f"{sample['__url__']}:{sample['__key__']}"
        try:
            if "cls" in sample:
                labels = [int(sample["cls"])]
            elif "labels.json" in sample:
                labels = [int(x) for x in json.loads(sample["labels.json"])]
            else:
                raise BadSample("no_label", f"{where} has neither .cls nor .labels.json")
        except (ValueError, TypeError) as err:
            if isinstance(err, BadSample):
                raise
            raise BadSample("bad_label", f"{where}: {err}") from None
        if not labels or any(not 0 <= c < self.num_classes for c in labels):
            raise BadSample("bad_label", f"{where}: labels {labels} outside [0, {self.num_classes})")
        if self.label_mode == "single":
            return torch.tensor(labels[0])
        target = torch.zeros(self.num_classes)
        target[labels] = 1.0
        return target

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        target = self.target(sample)
        return self.transform(self.image(sample)), target
