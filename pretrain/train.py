"""`python -m pretrain train --config configs/pretrain/X.yaml [key.sub=value ...]`

Parses, builds and runs: data stream -> model -> objective -> DeepSpeed engine -> loop.
Resumes from `<train.output_dir>/checkpoints/latest` when `train.resume=true` and one exists.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline.loader import build_loader
from data_pipeline.stream import StreamLoader
from pretrain.checkpoint import Checkpointer
from pretrain.config import PretrainConfig, dump_config, load_config
from pretrain.distributed import DistInfo, init_distributed, print0, shutdown
from pretrain.engine import build_engine, train_step
from pretrain.export import export_checkpoint
from pretrain.models import build_model
from pretrain.objectives import build_objective
from pretrain.tracking import build_tracker


@torch.no_grad()
def evaluate(ds_engine, loader: StreamLoader) -> dict[str, float]:
    """Mean loss and accuracy over one pass of `loader`, averaged over ranks."""
    ds_engine.eval()
    totals = torch.zeros(3)
    batches = iter(loader)
    for _ in range(loader.stream.batches_per_epoch()):
        images, targets = next(batches)
        dtype = torch.bfloat16 if ds_engine.bfloat16_enabled() else torch.float32
        loss, metrics = ds_engine(images.to(ds_engine.device, dtype), targets.to(ds_engine.device))
        n = len(images)
        totals += torch.tensor([loss.float().item() * n, metrics["accuracy"].float().item() * n, n])
    dist.all_reduce(totals)
    ds_engine.train()
    return {"val_loss": (totals[0] / totals[2]).item(), "val_accuracy": (totals[1] / totals[2]).item()}


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def run(cfg: PretrainConfig, dist_info: DistInfo) -> dict[str, float]:
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    loader = build_loader(cfg.data, rank=dist_info.rank, world_size=dist_info.world_size, urls=cfg.data.train_urls, train=True)
    backbone = build_model(cfg.model.name, num_classes=cfg.data.num_classes, grad_checkpointing=cfg.model.grad_checkpointing, **cfg.model.kwargs)
    ds_engine = build_engine(
        build_objective(cfg.train.objective, backbone, **cfg.train.objective_kwargs), optim=cfg.optim, engine=cfg.engine,
        micro_batch=cfg.data.batch_size, total_steps=cfg.train.steps,
    )
    output_dir = Path(cfg.train.output_dir)
    checkpointer = Checkpointer(output_dir / "checkpoints", keep_last=cfg.train.keep_last, rank=dist_info.rank)

    step, run_id = 0, None
    if cfg.train.resume:
        meta = checkpointer.load(ds_engine)
        if meta is not None:
            step, run_id = meta["step"], meta.get("run_id")
            loader.load_state_dict(meta["data"])
            print0(f"resumed from {meta['tag']} at step {step}")
    tracker = build_tracker(
        is_main=dist_info.is_main, tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name, parent_run_id=cfg.tracking.parent_run_id, run_id=run_id,
        tags={"stage": "pretrain", "model": cfg.model.name},
    )
    if run_id is None:
        tracker.log_params(dump_config(cfg) | {"world_size": dist_info.world_size})
    val_loader = build_loader(cfg.data, rank=dist_info.rank, world_size=dist_info.world_size, urls=cfg.data.val_urls, train=False) if cfg.data.val_urls else None

    def save() -> None:
        meta = {"config": dump_config(cfg), "data": loader.state_dict(), "run_id": tracker.run_id, "world_size": dist_info.world_size}
        # every rank knows the same run id only through rank 0
        meta_list = [meta]
        dist.broadcast_object_list(meta_list, src=0)
        checkpointer.save(ds_engine, step=step, meta=meta_list[0])

    accum = cfg.engine.grad_accum_steps
    global_batch = cfg.data.batch_size * accum * dist_info.world_size
    batches = iter(loader)
    last: dict[str, float] = {}
    window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
    progress = tqdm(total=cfg.train.steps, initial=step, desc="train", disable=not dist_info.is_main, mininterval=2)
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        data_wait += time.perf_counter() - t0
        loss, metrics = train_step(ds_engine, micro)
        step += 1
        window_steps += 1
        progress.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            stats = torch.tensor([loss, metrics.get("accuracy", 0.0)])
            dist.all_reduce(stats)
            stats /= dist_info.world_size
            elapsed = time.perf_counter() - window_start
            grad_norm = ds_engine.get_global_grad_norm()
            last = {
                "loss": stats[0].item(), "accuracy": stats[1].item(),
                "lr": ds_engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                "samples_per_s": window_steps * global_batch / elapsed,
                "data_wait_fraction": data_wait / elapsed,
                "memory_bytes": memory_bytes(dist_info.device),
                "bad_samples": sum(loader.bad_counts.values()),
                **{f"bad_samples/{k}": v for k, v in loader.bad_counts.items()},
            }
            tracker.log_metrics(last, step=step)
            progress.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}")
            window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
        if val_loader is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0:
            val = evaluate(ds_engine, val_loader)
            tracker.log_metrics(val, step=step)
            last.update(val)
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < cfg.train.steps:
            save()
    progress.close()
    if val_loader is not None and "val_accuracy" not in last:
        last.update(evaluate(ds_engine, val_loader))
        tracker.log_metrics({k: v for k, v in last.items() if k.startswith("val_")}, step=step)
    save()
    if dist_info.is_main:
        exported = export_checkpoint(output_dir / "checkpoints", output_dir / "export" / "model.safetensors")
        tracker.log_artifact(exported, "model")
        tracker.log_artifact(exported.with_suffix(".json"), "model")
        print0(f"exported {exported}")
    tracker.close()
    return last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/pretrain/demo_fmnist.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides)  # fails before any work
    dist_info = init_distributed()
    try:
        final = run(cfg, dist_info)
        print0("final " + " ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float)))
    finally:
        shutdown()
    return 0
