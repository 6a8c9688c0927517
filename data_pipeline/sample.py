"""The unit every source yields and every shard holds, and the checks of a raw shard sample
(kept free of torch so `write`, `inspect` and `verify` start fast)."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

from PIL import Image

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    ext: str  # "jpg" or "png": the encoded bytes' format, kept as the source had it
    label: int | tuple[int, ...] | None  # one class (i21k-style) or several (JFT-style)


class BadSample(ValueError):
    """A sample the stream skips and counts under `reason`; the message names shard and key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def where(sample: dict) -> str:
    return f"{sample['__url__']}:{sample['__key__']}"


def image_field(sample: dict) -> str:
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise BadSample("no_image", f"{where(sample)} has no image field")
    return field


def decode_image(sample: dict) -> Image.Image:
    """The sample's image, fully decoded, as RGB."""
    try:
        img = Image.open(io.BytesIO(sample[image_field(sample)]))
        img.load()
        return img.convert("RGB")
    except BadSample:
        raise
    except Exception as err:  # PIL raises many types for broken bytes
        raise BadSample("undecodable", f"{where(sample)}: {err}") from None


def raw_labels(sample: dict) -> list[int]:
    """The class indices in the sample's `.cls` or `.labels.json`, unchecked; [] when it has neither."""
    if "cls" in sample:
        return [int(sample["cls"])]
    if "labels.json" in sample:
        return [int(x) for x in json.loads(sample["labels.json"])]
    return []


def sample_labels(sample: dict, num_classes: int) -> list[int]:
    """The sample's class indices; BadSample when missing, unparsable or out of range."""
    if "cls" not in sample and "labels.json" not in sample:
        raise BadSample("no_label", f"{where(sample)} has neither .cls nor .labels.json")
    try:
        labels = raw_labels(sample)
    except (ValueError, TypeError) as err:
        raise BadSample("bad_label", f"{where(sample)}: {err}") from None
    if not labels:
        raise BadSample("no_label", f"{where(sample)} has an empty label list")
    if any(not 0 <= c < num_classes for c in labels):
        raise BadSample("bad_label", f"{where(sample)}: labels {labels} outside [0, {num_classes})")
    return labels
