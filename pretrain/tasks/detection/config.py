"""Typed recipe of `python -m pretrain detect`: one model per component, validated once."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from pretrain.config import EngineConfig, LoopConfig, OptimConfig, TrackingConfig, _Strict


class CocoSource(_Strict):
    """COCO-format annotations JSON and the folder its `file_name`s are relative to."""

    kind: Literal["coco"] = "coco"
    annotations: str
    images: str


class ShardSource(_Strict):
    """WebDataset shards: an image field plus a `json` field `{"boxes": [[x, y, w, h], ...], "labels": [...]}`."""

    kind: Literal["wds"] = "wds"
    urls: str


class ShapesSource(_Strict):
    """Coloured rectangles and circles on noise, written as COCO JSON into `dir` when absent."""

    kind: Literal["shapes"] = "shapes"
    dir: str
    num_images: int = Field(256, gt=0)
    image_size: int = Field(64, gt=8)
    max_objects: int = Field(3, gt=0)
    seed: int = 0


Source = Annotated[Union[CocoSource, ShardSource, ShapesSource], Field(discriminator="kind")]


class DetectDataConfig(_Strict):
    train: Source
    val: Source
    num_classes: int = Field(gt=0, description="object classes, without the no-object class")
    image_size: int = Field(224, gt=0, description="square side the images are resized to")
    max_objects: int = Field(50, gt=0, description="boxes kept per image (the rest are dropped)")
    batch_size: int = Field(8, gt=0, description="micro-batch per rank")
    num_workers: int = Field(0, ge=0)
    shuffle_buffer: int = Field(256, gt=0, description="shards only")
    hflip: bool = True
    seed: int = 0
    mean: tuple[float, float, float] | None = Field(None, description="default: the exported model's, else 0.5")
    std: tuple[float, float, float] | None = None
    max_corrupt_fraction: float = Field(0.01, ge=0, le=1)


class BackboneConfig(_Strict):
    """An exported model (`checkpoint`) or, for smoke runs, a registry model from scratch (`model`)."""

    checkpoint: str | None = Field(None, description="exported <name>.safetensors (sidecar <name>.json beside it), s3://, "
                                   "runs:/<run id> or models:/<name>@<alias> (pretrain.checkpoint.model_source)")
    model: str | None = Field(None, description="pretrain.models name, randomly initialised")
    kwargs: dict = Field(default_factory=dict, description="extra constructor args for `model` (not img_size)")
    freeze_steps: int = Field(0, ge=0, description="backbone learning rate is 0 for these first steps")
    lr_scale: float = Field(0.1, ge=0, description="backbone lr = optim.lr * lr_scale (DETR: 0.1)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.checkpoint is None) == (self.model is None):
            raise ValueError("give exactly one of backbone.checkpoint (an exported model) or backbone.model")
        if "img_size" in self.kwargs:
            raise ValueError("backbone.kwargs.img_size: the detection resolution is data.image_size")
        return self


class HeadConfig(_Strict):
    d_model: int = Field(256, gt=0)
    num_heads: int = Field(8, gt=0)
    num_layers: int = Field(6, gt=0, description="decoder layers; each adds an auxiliary loss")
    dim_feedforward: int = Field(2048, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    num_queries: int = Field(100, gt=0)
    pos_temperature: float = Field(10000.0, gt=1, description="sine encoding's longest wavelength (DETR: 10000)")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.num_heads or self.d_model % 4:
            raise ValueError(f"head.d_model={self.d_model} must divide by head.num_heads={self.num_heads} and by 4")
        return self


class LossConfig(_Strict):
    """Matching costs and loss weights (DETR's defaults)."""

    cost_class: float = Field(1.0, ge=0)
    cost_bbox: float = Field(5.0, ge=0)
    cost_giou: float = Field(2.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    bbox_weight: float = Field(5.0, ge=0)
    giou_weight: float = Field(2.0, ge=0)
    eos_coef: float = Field(0.1, gt=0, le=1, description="weight of the no-object class in the CE")
    aux_loss: bool = True


class DetectTrainConfig(LoopConfig):
    eval_every: int = Field(0, ge=0, description="0: only at the end")
    eval_at_start: bool = Field(False, description="also evaluate the untrained head (val_map_at_start)")
    output_dir: str = "runs/detect"
    seed: int = 0
    plot_images: int = Field(8, ge=0, description="validation images drawn in predictions.png")
    score_threshold: float = Field(0.5, ge=0, le=1, description="boxes drawn in predictions.png")


class DetectConfig(_Strict):
    data: DetectDataConfig
    backbone: BackboneConfig
    head: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig(lr=1e-4, weight_decay=1e-4)
    engine: EngineConfig = EngineConfig()
    train: DetectTrainConfig
    tracking: TrackingConfig = TrackingConfig()
