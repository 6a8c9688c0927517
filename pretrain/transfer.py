"""`python -m pretrain transfer --config configs/transfer/X.yaml [key.sub=value ...]`

Fine-tunes an exported model on a labelled data set with the DeepSpeed engine: head replaced
by a zero-initialised linear layer, lr picked on the dev split when `lr_grid` is given, then
trained on all of train and evaluated on test (top-1 and mean per-class accuracy).
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from data_pipeline.decode import build_transform
from pretrain.config import TransferConfig, dump_config, load_config
from pretrain.datasets import LabeledImages, load_dataset
from pretrain.distributed import DistInfo, init_distributed, print0, shutdown
from pretrain.engine import build_engine, train_step
from pretrain.export import load_exported
from pretrain.objectives import build_objective
from pretrain.tracking import Tracker, build_tracker


def zero_head(model: nn.Module) -> nn.Module:
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    return model


def _batches(data: LabeledImages, *, batch_size: int, dist_info: DistInfo, seed: int, num_workers: int):
    """Endless shuffled batches of this rank's share, reshuffled every epoch."""
    sampler = DistributedSampler(data, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


@torch.no_grad()
def evaluate(model: nn.Module, data: LabeledImages, *, dist_info: DistInfo, batch_size: int) -> dict[str, float]:
    """Top-1 and mean per-class accuracy; each rank scores a strided share, counts are summed."""
    model.eval()
    share = Subset(data, range(dist_info.rank, len(data), dist_info.world_size))
    correct = torch.zeros(data.num_classes, dtype=torch.float64)
    total = torch.zeros(data.num_classes, dtype=torch.float64)
    param = next(model.parameters())
    for images, labels in DataLoader(share, batch_size=batch_size):
        pred = model(images.to(param.device, param.dtype)).argmax(-1).cpu()
        total += torch.bincount(labels, minlength=data.num_classes)
        correct += torch.bincount(labels[pred == labels], minlength=data.num_classes)
    dist.all_reduce(correct)
    dist.all_reduce(total)
    seen = total > 0
    return {"top1": (correct.sum() / total.sum()).item(), "mean_per_class": (correct[seen] / total[seen]).mean().item()}


def finetune(cfg: TransferConfig, *, lr: float, train: LabeledImages, test: LabeledImages, dist_info: DistInfo,
             tracker: Tracker, prefix: str) -> dict[str, float]:
    """One fine-tuning run at `lr`; metrics logged under `prefix`."""
    torch.manual_seed(cfg.seed)
    model, meta = load_exported(cfg.model, image_size=cfg.data.image_size, num_classes=train.num_classes)
    zero_head(model).train()
    train.transform = build_transform(cfg.data.image_size, cfg.data.augment, meta["mean"], meta["std"])
    test.transform = build_transform(cfg.data.image_size, "none", meta["mean"], meta["std"])
    optim = cfg.optim.model_copy(update={"lr": lr})
    ds_engine = build_engine(build_objective("softmax_xent", model), optim=optim, engine=cfg.engine,
                             micro_batch=cfg.data.batch_size, total_steps=cfg.steps)
    batches = _batches(train, batch_size=cfg.data.batch_size, dist_info=dist_info, seed=cfg.seed, num_workers=cfg.data.num_workers)
    accum = cfg.engine.grad_accum_steps
    progress = tqdm(range(cfg.steps), desc=f"{prefix} lr={lr:g}", disable=not dist_info.is_main, mininterval=2)
    for step in progress:
        loss, metrics = train_step(ds_engine, [next(batches) for _ in range(accum)])
        if (step + 1) % 20 == 0 or step + 1 == cfg.steps:
            tracker.log_metrics({f"{prefix}/loss": loss, f"{prefix}/train_accuracy": metrics["accuracy"]}, step=step + 1)
            progress.set_postfix(loss=f"{loss:.3f}")
    result = evaluate(ds_engine.module.backbone, test, dist_info=dist_info, batch_size=cfg.data.batch_size * 2)
    tracker.log_metrics({f"{prefix}/{k}": v for k, v in result.items()}, step=cfg.steps)
    return result


def run(cfg: TransferConfig, dist_info: DistInfo) -> dict[str, float]:
    _, meta = load_exported(cfg.model)  # fail early on a bad path, and learn the source run
    tracker = build_tracker(
        is_main=dist_info.is_main, tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or f"transfer-{cfg.data.name}", parent_run_id=cfg.tracking.parent_run_id,
        tags={"stage": "transfer", "dataset": cfg.data.name, "pretrain_run_id": str(meta.get("run_id"))},
    )
    tracker.log_params(dump_config(cfg))
    lr = cfg.optim.lr
    if len(cfg.lr_grid) > 1:
        dev = {}
        for candidate in cfg.lr_grid:
            dev_train = load_dataset(cfg.data.name, cfg.data.root, "dev_train", dev_fraction=cfg.data.dev_fraction)
            dev_val = load_dataset(cfg.data.name, cfg.data.root, "dev_val", dev_fraction=cfg.data.dev_fraction)
            dev[candidate] = finetune(cfg, lr=candidate, train=dev_train, test=dev_val, dist_info=dist_info,
                                      tracker=tracker, prefix=f"dev/lr_{candidate:g}")["top1"]
        lr = max(dev, key=dev.get)  # ties go to the smaller lr (grid order)
        print0("dev accuracy per lr: " + ", ".join(f"{k:g}: {v:.3f}" for k, v in dev.items()) + f" -> lr {lr:g}")
    elif cfg.lr_grid:
        lr = cfg.lr_grid[0]
    train = load_dataset(cfg.data.name, cfg.data.root, "train")
    test = load_dataset(cfg.data.name, cfg.data.root, "test")
    result = finetune(cfg, lr=lr, train=train, test=test, dist_info=dist_info, tracker=tracker, prefix="test")
    tracker.log_params({"chosen_lr": lr})
    tracker.log_metrics({"top1": result["top1"], "mean_per_class": result["mean_per_class"]}, step=cfg.steps)
    tracker.close()
    return {"lr": lr, **result}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/transfer/demo_digits.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(TransferConfig, args.config, args.overrides)
    dist_info = init_distributed()
    try:
        result = run(cfg, dist_info)
        print0(f"transfer {cfg.data.name}: lr={result['lr']:g} top1={result['top1']:.4f} mean_per_class={result['mean_per_class']:.4f}")
    finally:
        shutdown()
    return 0
