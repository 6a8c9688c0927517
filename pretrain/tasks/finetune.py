"""`python -m pretrain transfer --config configs/transfer/X.yaml [key.sub=value ...]`

Fine-tuning as in the ViT paper (App. B.1.1), on the DeepSpeed engine: the exported backbone at
the fine-tuning resolution (position embeddings interpolated in 2-D), its head replaced by a
zero-initialised linear layer; SGD with momentum, cosine decay with warmup, grad clip 1. The lr
is chosen on the dev split (train minus a held-out part) when `lr_grid` is given, then every seed
of `seeds` trains on all of train and is scored on test: top-1 and mean per-class accuracy, per
seed and as mean ± std.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.decode import build_transform
from data_pipeline import storage
from pretrain.config import LoopConfig, TransferConfig, dump_config
from pretrain.datasets import LabeledImages, dataset_spec, dev_split, load_dataset
from pretrain.tasks.detection.data import MapBatches
from pretrain.engine.distributed import DistInfo, print0
from pretrain.evaluation import build_evaluator
from pretrain.checkpoint.model_source import local_exported, provenance_tags
from pretrain.objectives import build_objective
from pretrain.engine.perf import train_flops_per_sample
from pretrain.tracking.datasets import log_transfer_dataset
from pretrain.tracking.tracker import Tracker, build_tracker, failing_closes, seed_stats
from pretrain.tasks.recipe import add_recipe_arguments, run_recipe
from pretrain.trainer import Trainer, TrainCheckpoint
from pretrain.checkpoint.weights import load_exported

METRICS = ("top1", "mean_per_class")


class Augmented(Dataset):
    """`(epoch, index)` -> (image, label), the augmentation drawn from a generator seeded by
    (seed, epoch, index): the same draws in any worker and after any resume."""

    def __init__(self, data: LabeledImages, transform, seed: int):
        self.data, self.transform, self.seed = data, transform, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
            return self.transform(self.data.load(i)), int(self.data.labels[i])


class EpochIndexed(MapBatches):
    """MapBatches whose sampler hands out `(epoch, index)`, the key `Augmented` seeds from."""

    def _indices(self):
        epoch, left = self.epoch, self.per_rank - self.taken * self.batch_size
        for i in super()._indices():
            yield epoch, i
            left -= 1
            if not left:
                epoch, left = epoch + 1, self.per_rank


def finetune_loop(cfg: TransferConfig, prefix: str) -> LoopConfig:
    """The trainer's settings of one fine-tune: `cfg`'s, in its own folder (and mirror) `<data set>/<prefix>`."""
    loop = {name: getattr(cfg, name) for name in LoopConfig.model_fields}
    loop["output_dir"] = str(Path(cfg.output_dir) / cfg.data.name / prefix)
    loop["remote_uri"] = storage.join_url(cfg.remote_uri, cfg.data.name, prefix) if cfg.remote_uri else None
    return LoopConfig.model_validate(loop)


def finetune(cfg: TransferConfig, *, model_path: Path, lr: float, seed: int, train: LabeledImages, test: LabeledImages,
             dist_info: DistInfo, tracker: Tracker, prefix: str) -> dict[str, float]:
    """One fine-tuning run at `lr` from the exported weights, resumable; metrics logged under `prefix/`."""
    torch.manual_seed(seed)
    model, meta = load_exported(model_path, image_size=cfg.data.image_size, num_classes=train.num_classes)  # zero D x K head
    model.train()
    micro = cfg.data.batch_size
    transform = build_transform(cfg.data.image_size, cfg.data.augment, meta["mean"], meta["std"])
    data = EpochIndexed(Augmented(train, transform, seed), batch_size=micro, rank=dist_info.rank,
                        world_size=dist_info.world_size, num_workers=cfg.data.num_workers, seed=seed)
    test.transform = build_transform(cfg.data.image_size, "none", meta["mean"], meta["std"])
    score = build_evaluator("classification", data=test, batch_size=micro * 2, rank=dist_info.rank,
                            world_size=dist_info.world_size)
    objective = build_objective("softmax_xent", model)
    trainer = Trainer(objective, data=data, loop=finetune_loop(cfg, prefix), optim=cfg.optim.model_copy(update={"lr": lr}),
                      engine=cfg.engine, micro_batch=micro, dist_info=dist_info, config=dump_config(cfg),
                      evaluators=[score], flops_per_sample=train_flops_per_sample(objective, cfg.data.image_size),
                      metric_prefix=f"{prefix}/", save_final=bool(cfg.ckpt_every), desc=f"{prefix} lr={lr:g}")
    results = trainer.fit(tracker)
    trainer.close()
    return {k: results[k] for k in METRICS}


def resumed_run_id(cfg: TransferConfig, dist_info: DistInfo) -> str | None:
    """Collective: the MLflow run of the first fine-tune's checkpoint (local or on the mirror), if any."""
    first = f"dev/lr_{cfg.lr_grid[0]:g}" if len(cfg.lr_grid) > 1 else "test/seed0"
    loop = finetune_loop(cfg, first)
    point = TrainCheckpoint(loop.output_dir, keep_last=loop.keep_last, rank=dist_info.rank, world_size=dist_info.world_size,
                            remote_uri=loop.remote_uri, states={}, config={}).prepare()
    return point.meta.get("run_id") if point is not None else None


def choose_lr(cfg: TransferConfig, *, model_path: Path, train: LabeledImages, dist_info: DistInfo, tracker: Tracker) -> float:
    """The lr of `lr_grid` with the best dev top-1 (first seed; ties go to the earlier lr), else optim.lr."""
    if len(cfg.lr_grid) <= 1:
        return cfg.lr_grid[0] if cfg.lr_grid else cfg.optim.lr
    dev_train, dev_val = dev_split(train, cfg.data.dev_fraction or dataset_spec(cfg.data.name).dev_fraction)
    dev = {}
    for lr in cfg.lr_grid:
        dev[lr] = finetune(cfg, model_path=model_path, lr=lr, seed=cfg.seeds[0], train=train.subset(dev_train),
                           test=train.subset(dev_val), dist_info=dist_info, tracker=tracker, prefix=f"dev/lr_{lr:g}")["top1"]
    best = max(dev, key=dev.get)
    print0("dev top-1 per lr: " + ", ".join(f"{k:g}: {v:.4f}" for k, v in dev.items()) + f" -> lr {best:g}")
    return best


def summarize(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """`top1/seed<i>` per seed, `top1` the mean, `top1/std` (population std, as for few-shot)."""
    out = {}
    for key in METRICS:
        out.update(seed_stats(key, [r[key] for r in per_seed]))
    return out


def run(cfg: TransferConfig, dist_info: DistInfo) -> dict[str, float]:
    with local_exported(cfg.model, tracking_uri=cfg.tracking.tracking_uri) as model_path:
        _, meta = load_exported(model_path)  # fail early on a bad model, and learn the source run
        train = load_dataset(cfg.data.name, cfg.data.root, "train")
        test = load_dataset(cfg.data.name, cfg.data.root, "test")
        run_id = resumed_run_id(cfg, dist_info) if cfg.resume else None
        tracker = build_tracker(
            is_main=dist_info.is_main, tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
            run_name=cfg.tracking.run_name or f"transfer-{cfg.data.name}", parent_run_id=cfg.tracking.parent_run_id,
            tags={"stage": "transfer", "dataset": cfg.data.name, **provenance_tags(meta, cfg.model)}, run_id=run_id,
        )
        with failing_closes(tracker):
            if run_id is None:
                tracker.log_params(dump_config(cfg) | {"world_size": dist_info.world_size, "train_images": len(train),
                                                       "test_images": len(test), "num_classes": train.num_classes})
            log_transfer_dataset(tracker, cfg.data.name, cfg.data.root, {"train": train, "test": test})
            lr = choose_lr(cfg, model_path=model_path, train=train, dist_info=dist_info, tracker=tracker)
            per_seed = [finetune(cfg, model_path=model_path, lr=lr, seed=seed, train=train, test=test, dist_info=dist_info,
                                 tracker=tracker, prefix=f"test/seed{i}") for i, seed in enumerate(cfg.seeds)]
    summary = {"lr": lr, **summarize(per_seed)}
    tracker.log_params({"chosen_lr": lr})
    tracker.log_metrics(summary, step=cfg.steps)
    if dist_info.is_main:
        out = Path(cfg.output_dir) / cfg.data.name / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        storage.write_atomic(out, json.dumps({"model": cfg.model, "dataset": cfg.data.name, **summary}, indent=1).encode())
        tracker.log_artifact(out)
    tracker.close()
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, example="configs/transfer/cifar10.yaml",
                         overrides_help="key.sub=value overrides, e.g. model=runs:/<run id> data.root=/data/cifar")


def summary_line(cfg: TransferConfig, r: dict[str, float]) -> str:
    return (f"transfer {cfg.data.name}: lr={r['lr']:g} top1={r['top1']:.4f} ± {r['top1/std']:.4f} "
            f"mean_per_class={r['mean_per_class']:.4f} ± {r['mean_per_class/std']:.4f} ({len(cfg.seeds)} seeds)")


def main(args: argparse.Namespace) -> int:
    return run_recipe(TransferConfig, args, run, summary_line)
