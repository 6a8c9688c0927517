"""Typed configuration, one model per component, validated once at the edge.

A recipe is a YAML file; any field can be overridden from the CLI as `key.sub=value`
(the value is parsed as YAML, so `train.steps=100` is an int and `data.urls=[a,b]` a list).
An unknown key or a wrong type fails before any work, naming the key and the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from data_pipeline.config import DataConfig, StrictConfig as _Strict


class ModelConfig(_Strict):
    name: str
    grad_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile the backbone inside the DeepSpeed engine")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm constructor args")


class OptimConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["linear", "cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay (BEiT): block i of L gets "
                                      "lr x layer_decay^(L-i); timm's param_groups_layer_decay")


class EngineConfig(_Strict):
    """DeepSpeed settings; `deepspeed_json` entries override the generated config."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_accum_steps: int = Field(1, gt=0)
    global_batch: int | None = Field(None, gt=0, description="when set, grad_accum_steps is derived at start: "
                                     "global_batch / (data.batch_size x ranks), which must divide evenly")
    grad_clip: float = Field(1.0, ge=0)
    deepspeed_json: str | None = None
    # GPU settings (pretrain.engine.deepspeed_engine.deepspeed_config); None leaves DeepSpeed's own default.
    zero_init: bool = Field(True, description="ZeRO-3: build the model under deepspeed.zero.Init, each parameter "
                            "partitioned as its module is built, so no rank holds the whole fp32 model")
    grad_accum_dtype: Literal["fp32", "bf16"] | None = Field(None, description="data_types.grad_accum_dtype: fp32 "
                                                              "accumulates bf16 gradients in fp32 (ZeRO-1's BF16 optimizer)")
    communication_dtype: Literal["fp32", "bf16"] | None = Field(None, description="communication_data_type: "
                                                                 "the gradient reduction's dtype")
    overlap_comm: bool | None = Field(None, description="overlap gradient reduction with the backward pass")
    contiguous_gradients: bool | None = Field(None, description="copy gradients into one buffer as they are produced")
    bucket_size: int | None = Field(None, gt=0, description="elements per reduce/all-gather bucket")
    prefetch_bucket_size: int | None = Field(None, gt=0, description="ZeRO-3: elements of parameters prefetched ahead")
    param_persistence_threshold: int | None = Field(None, ge=0, description="ZeRO-3: parameters under this many "
                                                    "elements stay whole on every rank (no gather per use)")
    max_live_parameters: int | None = Field(None, gt=0, description="ZeRO-3: gathered elements kept at most")


class EmaConfig(_Strict):
    """Exponential moving average of the weights, sharded over the ranks; exported as `model_ema`."""

    decay: float = Field(0.9999, gt=0, lt=1)
    warmup: bool = Field(True, description="decay min(decay, (1+t)/(10+t)) at update t, so early weights fade fast")


class FewshotHookConfig(_Strict):
    """Few-shot ridge evaluation of the backbone every `every` steps (rank 0, on a gathered fp32 copy)."""

    every: int = Field(gt=0)
    datasets: list[str] = Field(min_length=1, description="names of pretrain.datasets, or name=root")
    data_root: str | None = None
    shots: list[int] = Field([10], min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    l2: float | None = Field(None, gt=0, description="None: chosen on the dev splits")
    max_train_per_class: int | None = Field(None, gt=0)
    max_test: int | None = Field(None, gt=0)
    batch_size: int = Field(256, gt=0)


class LoopConfig(_Strict):
    """What the trainer (pretrain.trainer) reads, the same for every task: steps, cadences, checkpoints, EMA."""

    steps: int = Field(gt=0)
    log_every: int = Field(10, gt=0)
    ckpt_every: int = Field(0, ge=0, description="0: only at the end")
    keep_last: int = Field(2, gt=0)
    output_dir: str = "runs/pretrain"
    remote_uri: str | None = Field(None, pattern=r"^s3://[^/]+", description="s3://bucket/prefix mirroring output_dir: "
                                   "checkpoints uploaded after each save, resumed from when the local copy is missing")
    resume: bool = False
    peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s of one device for MFU; default: from the device")
    ema: EmaConfig | None = None


class TrainConfig(LoopConfig):
    objective: str = Field("softmax_xent", description="a name of pretrain.objectives.OBJECTIVES")
    objective_kwargs: dict[str, Any] = Field(default_factory=dict, description="the objective's keyword arguments")
    eval_every: int = Field(0, ge=0)
    seed: int = 0
    fewshot: FewshotHookConfig | None = None
    visualize_every: int = Field(0, ge=0, description="objectives with visualize(images): a PNG every N steps")

    @field_validator("objective_kwargs")
    @classmethod
    def _normalisation_comes_from_data(cls, value: dict[str, Any]) -> dict[str, Any]:
        if given := sorted({"pixel_mean", "pixel_std"} & value.keys()):
            raise ValueError(f"{', '.join(given)}: objectives take the data's normalisation; set data.mean/data.std (or data.normalize) instead")
        return value


class TrackingConfig(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "vitscale"
    run_name: str | None = None
    parent_run_id: str | None = None
    registered_model: str | None = Field(None, description="Model Registry name of pretraining's export; default vitscale-<model.name>")


class PretrainConfig(_Strict):
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    engine: EngineConfig = EngineConfig()
    train: TrainConfig
    tracking: TrackingConfig = TrackingConfig()


class ConfigError(ValueError):
    """A recipe that cannot run: the message names the file and the key."""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`, values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a field below the scalar {part!r}")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


C = TypeVar("C", bound=BaseModel)


def load_config(cls: type[C], path: str | Path, overrides: list[str] | None = None) -> C:
    """Read YAML `path`, apply `key.sub=value` overrides, validate into `cls`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; recipes live in configs/")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"  {key}: {what}")
        raise ConfigError(f"invalid config {path}:\n" + "\n".join(problems)) from None


def dump_config(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


class TransferDataConfig(_Strict):
    name: str = Field(description="a data set of pretrain.datasets: cifar10, cifar100, pets, flowers102, imagefolder, digits")
    root: str | None = Field(None, description="folder (or .tar.gz) of the data set's official files")
    image_size: int = Field(gt=0, description="fine-tuning resolution; position embeddings are resampled in 2-D")
    batch_size: int = Field(64, gt=0, description="micro-batch per rank (engine.global_batch sets the global one)")
    num_workers: int = Field(0, ge=0)
    augment: Literal["none", "flip", "inception"] = "inception"
    dev_fraction: float | None = Field(None, gt=0, lt=1, description="held out of train to choose the lr; default: "
                                       "the data set's own (2 % CIFAR, 10 % Pets and Flowers)")


class TransferConfig(LoopConfig):
    """Fine-tuning recipe of the ViT paper (App. B.1.1): zero-init head, SGD, cosine, clip 1.
    Each fine-tune (an lr of `lr_grid` on dev, a seed on test) checkpoints and resumes under
    `<output_dir>/<data set>/<dev/lr_X|test/seedI>/` as a pretraining run does."""

    model: str = Field(description="exported .safetensors, s3://bucket/key.safetensors, runs:/<run id>, mlflow:<run id>, "
                                   "models:/<name>@<alias> or models:/<name>/<version>")
    data: TransferDataConfig
    optim: OptimConfig = OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, decay="cosine")
    lr_grid: list[Annotated[float, Field(gt=0)]] = Field(default_factory=list, description="chosen on the dev split when given")
    engine: EngineConfig = EngineConfig(zero_stage=0)
    seeds: list[int] = Field([0], min_length=1, description="final fine-tuning runs; mean and std are reported")
    output_dir: str = "runs/transfer"
    tracking: TrackingConfig = TrackingConfig()
