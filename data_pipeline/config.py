"""Typed configuration of the training data stream (the `data:` section of a recipe)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictConfig(BaseModel):
    """Unknown keys are errors; validated once, then read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictConfig):
    """Where the shards are and how a rank streams them."""

    train_urls: str
    val_urls: str | None = None
    batch_size: int = Field(64, gt=0, description="micro-batch per rank")
    num_workers: int = Field(0, ge=0)
    shuffle_buffer: int = Field(1000, gt=0)
    seed: int = 0
    image_size: int = Field(224, gt=0)
    label_mode: Literal["single", "multi", "none"] = Field("single", description="none: unlabelled (self-supervised)")
    num_classes: int = Field(gt=0)
    augment: Literal["none", "flip", "inception"] = "flip"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_corrupt_fraction: float = Field(0.01, ge=0, le=1)
