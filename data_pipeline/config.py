"""Typed configuration of the training data stream (the `data:` section of a recipe)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from timm.data.constants import (
    IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
)

# Per-model normalisation by name (timm's constants), for `data.normalize`.
NORMALIZATION = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "inception": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}


class StrictConfig(BaseModel):
    """Unknown keys are errors; validated once, then read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictConfig):
    """Where the shards are and how a rank streams, decodes and augments them."""

    train_urls: str
    val_urls: str | None = None
    batch_size: int = Field(64, gt=0, description="micro-batch per rank")
    num_workers: int = Field(0, ge=0)
    shuffle_buffer: int = Field(1000, gt=0, description="samples shuffled together in a worker (one block, held raw)")
    interleave_shards: int = Field(256, gt=0, description="shards each worker reads side by side; a block draws from all")
    seed: int = 0
    image_size: int = Field(224, gt=0)
    label_mode: Literal["single", "multi", "none"] = Field("single", description="none: unlabelled (self-supervised)")
    num_classes: int = Field(gt=0)
    augment: Literal["none", "center", "flip", "inception"] = Field(
        "flip", description="none: squash to size; center: timm's eval crop (crop_pct); flip; inception: random resized crop + flip")
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_pct: float = Field(0.875, gt=0, le=1, description="augment=center: the centre crop's share of the short side")
    eval_crop_pct: float | None = Field(None, gt=0, le=1, description="evaluation: centre crop share, or None to squash")
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    randaugment: str | None = Field(None, description="timm RandAugment config, e.g. rand-m9-mstd0.5-inc1")
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="applied to mixup/cutmix soft targets")
    fast_jpeg: bool = Field(True, description="JPEGs decoded at reduced DCT scale when the crop allows (PIL draft), "
                            "crops resized by torch's uint8 kernel; false: Pillow decodes, crops and resizes")
    normalize: Literal["imagenet", "inception", "clip"] | None = Field(None, description="sets mean/std to timm's constants")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_corrupt_fraction: float = Field(0.01, ge=0, le=1)
    host_dtype: Literal["uint8", "float32"] = Field("uint8", description="batches as the loader workers hand them over: "
                                                    "uint8, normalised on the device after the copy (a quarter of the "
                                                    "bytes); float32, normalised in the workers (CPU training)")

    @model_validator(mode="before")
    @classmethod
    def _named_normalization(cls, values):
        if isinstance(values, dict) and values.get("normalize"):
            if "mean" in values or "std" in values:
                raise ValueError("give data.normalize or data.mean/std, not both")
            if values["normalize"] in NORMALIZATION:
                values = {**values, "mean": NORMALIZATION[values["normalize"]][0], "std": NORMALIZATION[values["normalize"]][1]}
        return values

    @field_validator("randaugment")
    @classmethod
    def _known_randaugment(cls, value):
        if value is not None:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(value, {})
            except Exception as err:
                raise ValueError(f"data.randaugment {value!r} is not a timm RandAugment string like rand-m9-mstd0.5 ({err})") from None
        return value

    @model_validator(mode="after")
    def _mixup_needs(self):
        if self.mixes:
            if self.label_mode == "none":
                raise ValueError("mixup/cutmix mix labels: they need label_mode single or multi")
            if self.batch_size % 2:
                raise ValueError(f"mixup/cutmix pair each batch with its reverse: batch_size {self.batch_size} must be even")
        return self

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0
