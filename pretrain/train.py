"""`python -m pretrain train --config configs/pretrain/X.yaml [key.sub=value ...]`

Parses, builds and runs: data stream -> model -> objective -> DeepSpeed engine -> loop.
Resumes from `<train.output_dir>/checkpoints/latest` when `train.resume=true` and one exists
(or from `<train.remote_uri>/checkpoints/latest` when the local folder has none), on any
number of ranks.
"""
from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline.loader import build_loader
from data_pipeline.stream import StreamLoader
from data_pipeline import storage
from pretrain.checkpoint import Checkpointer
from pretrain.config import FewshotHookConfig, PretrainConfig, dump_config, load_config
from pretrain.distributed import DistInfo, init_distributed, print0, shutdown
from pretrain.ema import ShardedEMA
from pretrain.engine import build_engine, build_partitioned, compile_blocks, eval_copy, input_dtype, resolve_grad_accum, train_step
from pretrain.export import export_checkpoint, upload_exported
from pretrain.models import build_model
from pretrain.objectives import build_objective
from pretrain.perf import device_peak_flops, fused_attention, mfu, train_flops_per_sample
from pretrain.model_registry import registered_name
from pretrain.tracked_data import log_shard_datasets
from pretrain.tracking import Tracker, build_tracker


@torch.no_grad()
def evaluate(ds_engine, loader: StreamLoader) -> dict[str, float]:
    """Mean loss and metrics over one pass of `loader`, averaged over ranks (`val_` prefixed)."""
    ds_engine.eval()
    sums: dict[str, float] = {}
    count = 0
    batches = iter(loader)
    for _ in range(loader.stream.batches_per_epoch()):
        images, targets = next(batches)
        loss, metrics = ds_engine(images.to(ds_engine.device, input_dtype(ds_engine)), targets.to(ds_engine.device))
        for key, value in {"loss": loss, **metrics}.items():
            sums[key] = sums.get(key, 0.0) + value.float().item() * len(images)
        count += len(images)
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64)
    dist.all_reduce(totals)
    ds_engine.train()
    return {f"val_{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(keys)}


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def run_fewshot(backbone: torch.nn.Module, fewshot: FewshotHookConfig, cfg: PretrainConfig, tracker: Tracker, step: int) -> dict[str, float]:
    from pretrain.fewshot_cli import evaluate_fewshot, log_fewshot, parse_datasets

    roots = parse_datasets(fewshot.datasets, fewshot.data_root)
    results = evaluate_fewshot(
        backbone, datasets=list(roots), data_root=roots, image_size=cfg.data.image_size, mean=cfg.data.mean,
        std=cfg.data.std, shots=fewshot.shots, seeds=fewshot.seeds, l2=fewshot.l2,
        max_train_per_class=fewshot.max_train_per_class, max_test=fewshot.max_test, batch_size=fewshot.batch_size,
    )
    return log_fewshot(tracker, results, step)


def run(cfg: PretrainConfig, dist_info: DistInfo) -> dict[str, float]:
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    loader = build_loader(cfg.data, rank=dist_info.rank, world_size=dist_info.world_size, urls=cfg.data.train_urls, train=True)
    accum = resolve_grad_accum(cfg.engine, micro_batch=cfg.data.batch_size, world_size=dist_info.world_size)
    global_batch = cfg.data.batch_size * accum * dist_info.world_size
    build_backbone = functools.partial(build_model, cfg.model.name, num_classes=cfg.data.num_classes,
                                       grad_checkpointing=cfg.model.grad_checkpointing, **cfg.model.kwargs)

    def build_full_objective() -> torch.nn.Module:
        return build_objective(cfg.train.objective, build_backbone(), pixel_mean=cfg.data.mean, pixel_std=cfg.data.std,
                               **cfg.train.objective_kwargs)

    objective = build_partitioned(build_full_objective, cfg.engine, micro_batch=cfg.data.batch_size)  # zero.Init at ZeRO-3
    if cfg.train.visualize_every and not callable(getattr(objective, "visualize", None)):
        raise ValueError(f"train.visualize_every needs an objective with visualize(images); {cfg.train.objective!r} has none")
    flops_per_sample = train_flops_per_sample(objective, cfg.data.image_size)
    peak_flops = cfg.train.peak_flops or device_peak_flops(dist_info.device, cfg.engine.precision)

    output_dir = Path(cfg.train.output_dir)
    checkpointer = Checkpointer(output_dir / "checkpoints", keep_last=cfg.train.keep_last, rank=dist_info.rank,
                                world_size=dist_info.world_size,
                                remote_uri=storage.join_url(cfg.train.remote_uri, "checkpoints") if cfg.train.remote_uri else None)
    point = checkpointer.prepare_resume() if cfg.train.resume else None
    ds_engine = build_engine(
        objective, optim=cfg.optim, engine=cfg.engine, micro_batch=cfg.data.batch_size, grad_accum_steps=accum,
        total_steps=cfg.train.steps, load_universal=point is not None and point.universal,
    )
    if cfg.model.compile:
        compile_blocks(ds_engine.module)
    ema = None
    if cfg.train.ema is not None:
        ema = ShardedEMA(ds_engine.module, decay=cfg.train.ema.decay, warmup=cfg.train.ema.warmup,
                         rank=dist_info.rank, world_size=dist_info.world_size)

    step, run_id = 0, None
    if point is not None:
        checkpointer.load(ds_engine, point, ema=ema)
        step, run_id = point.step, point.meta.get("run_id")
        loader.load_state_dict(point.meta["data"])
        print0(f"resumed from {point.tag} at step {step}"
               + (f" (saved on {point.meta['world_size']} ranks, now {dist_info.world_size})" if point.universal else ""))
    tracker = build_tracker(
        is_main=dist_info.is_main, tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name, parent_run_id=cfg.tracking.parent_run_id, run_id=run_id,
        tags={"stage": "pretrain", "model": cfg.model.name},
    )
    if run_id is None:
        tracker.log_params(dump_config(cfg) | {"flops_per_sample": flops_per_sample, "fused_attn": fused_attention(objective)})
        log_shard_datasets(tracker, train=cfg.data.train_urls, val=cfg.data.val_urls)
    # Per start, not params: an elastic resume changes them within one run.
    tracker.log_metrics({"world_size": dist_info.world_size, "grad_accum_steps": accum, "global_batch": global_batch}, step=step)
    val_loader = build_loader(cfg.data, rank=dist_info.rank, world_size=dist_info.world_size, urls=cfg.data.val_urls, train=False) if cfg.data.val_urls else None
    fixed_images = None
    if cfg.train.visualize_every and dist_info.is_main:  # a fixed batch, augmentation off, outside the training stream
        vis_loader = build_loader(cfg.data, rank=0, world_size=1, urls=cfg.data.val_urls or cfg.data.train_urls, train=False)
        fixed_images = next(iter(vis_loader))[0][:8]

    def save() -> None:
        meta = {"config": dump_config(cfg), "data": loader.state_dict(), "run_id": tracker.run_id}
        # every rank knows the same run id only through rank 0
        meta_list = [meta]
        dist.broadcast_object_list(meta_list, src=0)
        checkpointer.save(ds_engine, step=step, meta=meta_list[0], ema=ema)

    def hooks_due(every: int) -> bool:
        return bool(every) and step % every == 0

    def run_hooks(*, fewshot_due: bool, visualize_due: bool) -> None:
        """Few-shot and visualization on a gathered fp32 copy on rank 0; the training RNG is untouched."""
        with torch.random.fork_rng(devices=[dist_info.device] if dist_info.device.type == "cuda" else []):
            if fewshot_due:
                backbone = eval_copy(ds_engine.module.backbone, build_backbone, is_main=dist_info.is_main, device=dist_info.device)
                if backbone is not None:
                    fewshot = run_fewshot(backbone, cfg.train.fewshot, cfg, tracker, step)
                    last.update({k: v for k, v in fewshot.items() if k.count("/") == 2})
                    del backbone
            if visualize_due:
                copy = eval_copy(ds_engine.module, build_full_objective, is_main=dist_info.is_main, device=dist_info.device)
                if copy is not None:
                    path = output_dir / "visualize" / f"step{step:08d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    copy.visualize(fixed_images.to(dist_info.device)).save(path)
                    tracker.log_artifact(path, "visualize")
                    del copy
        dist.barrier()

    batches = iter(loader)
    last: dict[str, float] = {}
    busy, data_wait, window_steps = 0.0, 0.0, 0
    progress = tqdm(total=cfg.train.steps, initial=step, desc="train", disable=not dist_info.is_main, mininterval=2)
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        t1 = time.perf_counter()
        loss, metrics = train_step(ds_engine, micro)
        if ema is not None:
            ema.update()
        busy += time.perf_counter() - t0
        data_wait += t1 - t0
        step += 1
        window_steps += 1
        progress.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            keys = sorted(metrics)
            stats = torch.tensor([loss] + [metrics[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(stats)
            stats /= dist_info.world_size
            samples_per_s = window_steps * global_batch / busy
            last = {
                "loss": stats[0].item(), **{k: stats[i + 1].item() for i, k in enumerate(keys)},
                "lr": max(ds_engine.get_lr()),
                "samples_per_s": samples_per_s,
                "step_time_s": busy / window_steps,
                "data_wait_fraction": data_wait / busy,
                "memory_bytes": memory_bytes(dist_info.device),
                "bad_samples": sum(loader.bad_counts.values()),
                **{f"bad_samples/{k}": v for k, v in loader.bad_counts.items()},
            }
            if peak_flops:
                last["mfu"] = mfu(samples_per_s, flops_per_sample, world_size=dist_info.world_size, peak_flops=peak_flops)
            tracker.log_metrics(last, step=step)
            progress.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}")
            busy, data_wait, window_steps = 0.0, 0.0, 0
        if val_loader is not None and hooks_due(cfg.train.eval_every):
            val = evaluate(ds_engine, val_loader)
            tracker.log_metrics(val, step=step)
            last.update(val)
        fewshot_due = cfg.train.fewshot is not None and hooks_due(cfg.train.fewshot.every)
        visualize_due = hooks_due(cfg.train.visualize_every)
        if fewshot_due or visualize_due:
            run_hooks(fewshot_due=fewshot_due, visualize_due=visualize_due)
        if hooks_due(cfg.train.ckpt_every) and step < cfg.train.steps:
            save()
    progress.close()
    if val_loader is not None and "val_loss" not in last:
        last.update(evaluate(ds_engine, val_loader))
        tracker.log_metrics({k: v for k, v in last.items() if k.startswith("val_")}, step=step)
    save()
    if dist_info.is_main:
        for weights in ("model", "ema") if ema is not None else ("model",):
            name = "model.safetensors" if weights == "model" else "model_ema.safetensors"
            exported = Path(export_checkpoint(output_dir / "checkpoints", output_dir / "export" / name, weights=weights))
            tracker.log_artifact(exported, "model")
            tracker.log_artifact(exported.with_suffix(".json"), "model")
            if cfg.train.remote_uri:
                upload_exported(exported, storage.join_url(cfg.train.remote_uri, "export", exported.name))
            print0(f"exported {exported}")
        tracker.register_model(registered_name(cfg.tracking.registered_model, cfg.model.name), model=cfg.model.name, step=step)
    checkpointer.close()
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
