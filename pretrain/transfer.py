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
import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data_pipeline.decode import build_transform
from data_pipeline.storage import write_atomic
from pretrain.config import TransferConfig, dump_config, load_config
from pretrain.datasets import LabeledImages, dataset_spec, dev_split, load_dataset
from pretrain.distributed import DistInfo, init_distributed, print0, shutdown
from pretrain.engine import build_engine, resolve_grad_accum, train_step
from pretrain.model_source import local_exported, provenance_tags
from pretrain.objectives import build_objective
from pretrain.tracked_data import log_transfer_dataset
from pretrain.tracking import Tracker, build_tracker, failing_closes, seed_stats
from pretrain.weights import load_exported

METRICS = ("top1", "mean_per_class")


def _batches(data: LabeledImages, *, batch_size: int, dist_info: DistInfo, seed: int, num_workers: int):
    """Endless shuffled batches of this rank's share, reshuffled every epoch."""
    if len(data) < batch_size * dist_info.world_size:
        raise ValueError(f"{len(data)} training images are fewer than one global batch ({batch_size} x {dist_info.world_size} ranks)")
    sampler = DistributedSampler(data, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledImages, *, dist_info: DistInfo, batch_size: int) -> dict[str, float]:
    """Top-1 and mean per-class accuracy; each rank scores a strided share, counts are summed.

    Every rank runs the same number of batches (the last ones padded and ignored), as ZeRO-3's
    forward passes need all ranks.
    """
    model.eval()
    per_rank = math.ceil(len(data) / dist_info.world_size)
    share = np.arange(dist_info.rank, len(data), dist_info.world_size)
    padded = np.concatenate([share, np.zeros(per_rank - len(share), dtype=share.dtype)])
    valid = torch.arange(per_rank) < len(share)
    correct = torch.zeros(data.num_classes, dtype=torch.float64)
    total = torch.zeros(data.num_classes, dtype=torch.float64)
    param = next(model.parameters())
    for i, (images, labels) in enumerate(DataLoader(data.subset(padded), batch_size=batch_size)):
        keep = valid[i * batch_size : i * batch_size + len(labels)]
        pred = model(images.to(param.device, param.dtype)).argmax(-1).cpu()
        labels = labels[keep]
        total += torch.bincount(labels, minlength=data.num_classes)
        correct += torch.bincount(labels[pred[keep] == labels], minlength=data.num_classes)
    dist.all_reduce(correct)
    dist.all_reduce(total)
    seen = total > 0
    return {"top1": (correct.sum() / total.sum()).item(), "mean_per_class": (correct[seen] / total[seen]).mean().item()}


def finetune(cfg: TransferConfig, *, model_path: Path, lr: float, seed: int, train: LabeledImages, test: LabeledImages,
             dist_info: DistInfo, tracker: Tracker, prefix: str) -> dict[str, float]:
    """One fine-tuning run at `lr` from the exported weights; metrics logged under `prefix`."""
    torch.manual_seed(seed)
    model, meta = load_exported(model_path, image_size=cfg.data.image_size, num_classes=train.num_classes)  # zero D x K head
    model.train()
    train.transform = build_transform(cfg.data.image_size, cfg.data.augment, meta["mean"], meta["std"])
    test.transform = build_transform(cfg.data.image_size, "none", meta["mean"], meta["std"])
    micro = cfg.data.batch_size
    accum = resolve_grad_accum(cfg.engine, micro_batch=micro, world_size=dist_info.world_size)
    ds_engine = build_engine(build_objective("softmax_xent", model), optim=cfg.optim.model_copy(update={"lr": lr}),
                             engine=cfg.engine, micro_batch=micro, grad_accum_steps=accum, total_steps=cfg.steps)
    batches = _batches(train, batch_size=micro, dist_info=dist_info, seed=seed, num_workers=cfg.data.num_workers)
    progress = tqdm(range(cfg.steps), desc=f"{prefix} lr={lr:g}", disable=not dist_info.is_main, mininterval=2)
    for step in progress:
        loss, metrics = train_step(ds_engine, [next(batches) for _ in range(accum)])
        if (step + 1) % 20 == 0 or step + 1 == cfg.steps:
            tracker.log_metrics({f"{prefix}/loss": loss, f"{prefix}/train_accuracy": metrics["accuracy"]}, step=step + 1)
            progress.set_postfix(loss=f"{loss:.3f}")
    result = evaluate(ds_engine.module.backbone, test, dist_info=dist_info, batch_size=micro * 2)
    tracker.log_metrics({f"{prefix}/{k}": v for k, v in result.items()}, step=cfg.steps)
    return result


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
        tracker = build_tracker(
            is_main=dist_info.is_main, tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
            run_name=cfg.tracking.run_name or f"transfer-{cfg.data.name}", parent_run_id=cfg.tracking.parent_run_id,
            tags={"stage": "transfer", "dataset": cfg.data.name, **provenance_tags(meta, cfg.model)},
        )
        with failing_closes(tracker):
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
        write_atomic(out, json.dumps({"model": cfg.model, "dataset": cfg.data.name, **summary}, indent=1).encode())
        tracker.log_artifact(out)
    tracker.close()
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/transfer/cifar10.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model=runs:/<run id> data.root=/data/cifar")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(TransferConfig, args.config, args.overrides)
    dist_info = init_distributed()
    try:
        r = run(cfg, dist_info)
        print0(f"transfer {cfg.data.name}: lr={r['lr']:g} top1={r['top1']:.4f} ± {r['top1/std']:.4f} "
               f"mean_per_class={r['mean_per_class']:.4f} ± {r['mean_per_class/std']:.4f} ({len(cfg.seeds)} seeds)")
    finally:
        shutdown()
    return 0
