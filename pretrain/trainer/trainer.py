"""The one training loop of every task (pretraining, fine-tuning, detection).

A task hands the trainer its objective (and parameter groups), its resumable data, its
evaluators and its config; the trainer builds the DeepSpeed engine, resumes, runs the steps,
logs every `log_every` steps (loss and the objective's metrics averaged over ranks, lr,
samples/s, MFU, memory), keeps the EMA, runs each evaluator at its cadence and checkpoints
(locally and to the S3 mirror). The task exports afterwards. As torchtitan's `Trainer`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import psutil
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from pretrain.config import EngineConfig, LoopConfig, OptimConfig
from pretrain.engine.distributed import DistInfo, print0
from pretrain.engine.ema import ShardedEMA
from pretrain.engine.deepspeed_engine import build_engine, resolve_grad_accum, train_step
from pretrain.evaluation.common import Evaluator
from pretrain.engine.perf import device_peak_flops, mfu
from pretrain.tracking.tracker import Tracker
from pretrain.trainer.checkpointing import Stateful, TrainCheckpoint


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


class Trainer:
    """Built collectively on every rank; `run_id` is the resumed run's MLflow id (None when fresh),
    for the task's tracker, then `fit(tracker)` trains and `close()` waits for the last upload."""

    def __init__(self, objective: nn.Module, *, data: Stateful, loop: LoopConfig, optim: OptimConfig, engine: EngineConfig,
                 micro_batch: int, dist_info: DistInfo, config: dict[str, Any], groups: list[dict] | None = None,
                 evaluators: Sequence[Evaluator] = (), flops_per_sample: float | None = None, metric_prefix: str = "",
                 before_step: Callable[[int], None] | None = None, save_final: bool = True, desc: str = "train"):
        self.loop, self.dist_info, self.data, self.evaluators = loop, dist_info, data, list(evaluators)
        self.prefix, self.before_step, self.save_final, self.desc = metric_prefix, before_step, save_final, desc
        self.accum = resolve_grad_accum(engine, micro_batch=micro_batch, world_size=dist_info.world_size)
        self.global_batch = micro_batch * self.accum * dist_info.world_size
        self.flops_per_sample = flops_per_sample
        self.peak_flops = loop.peak_flops or device_peak_flops(dist_info.device, engine.precision)
        self.output_dir = Path(loop.output_dir)
        self.checkpoint = TrainCheckpoint(self.output_dir, keep_last=loop.keep_last, rank=dist_info.rank,
                                          world_size=dist_info.world_size, remote_uri=loop.remote_uri,
                                          states={"data": data}, config=config)
        point = self.checkpoint.prepare() if loop.resume else None
        self.engine = build_engine(objective, groups, optim=optim, engine=engine, micro_batch=micro_batch,
                                   grad_accum_steps=self.accum, total_steps=loop.steps,
                                   load_universal=point is not None and point.universal)
        self.ema = None
        if loop.ema is not None:
            self.ema = ShardedEMA(self.engine.module, decay=loop.ema.decay, warmup=loop.ema.warmup,
                                  rank=dist_info.rank, world_size=dist_info.world_size)
        self.step, self.run_id = 0, None
        if point is not None:
            self.checkpoint.load(self.engine, point, ema=self.ema)
            self.step, self.run_id = point.step, point.meta.get("run_id")
            print0(f"resumed from {point.tag} at step {self.step}"
                   + (f" (saved on {point.meta['world_size']} ranks, now {dist_info.world_size})" if point.universal else ""))

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoint.root

    def log(self, tracker: Tracker, metrics: dict[str, float]) -> None:
        tracker.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items()}, step=self.step)

    def save(self, tracker: Tracker) -> Path:
        return self.checkpoint.save(self.engine, step=self.step, run_id=tracker.run_id, ema=self.ema)

    def evaluate(self, tracker: Tracker, *, last: bool, suffix: str = "") -> dict[str, float]:
        """The evaluators due now, on a forked RNG (training draws the same numbers as without them)."""
        due = [e for e in self.evaluators if (e.at_start if suffix else e.due(self.step, last=last))]
        if not due:
            return {}
        results: dict[str, float] = {}
        device = self.dist_info.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for evaluator in due:
                results.update({f"{k}{suffix}": v for k, v in evaluator.run(self.engine, step=self.step, final=last,
                                                                             tracker=tracker).items()})
        self.log(tracker, results)
        dist.barrier()  # some evaluators work on rank 0 alone
        return results

    def fit(self, tracker: Tracker) -> dict[str, float]:
        """Train to `loop.steps`; returns the last logged metrics and every evaluator's last results."""
        # Per start, not params: an elastic resume changes them within one run.
        self.log(tracker, {"world_size": self.dist_info.world_size, "grad_accum_steps": self.accum,
                           "global_batch": self.global_batch})
        results = self.evaluate(tracker, last=False, suffix="_at_start") if self.step == 0 else {}
        batches = iter(self.data)
        window = _Window()
        progress = tqdm(total=self.loop.steps, initial=self.step, desc=self.desc, disable=not self.dist_info.is_main, mininterval=2)
        while self.step < self.loop.steps:
            if self.before_step is not None:
                self.before_step(self.step)
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(self.accum)]
            t1 = time.perf_counter()
            loss, metrics = train_step(self.engine, micro)
            if self.ema is not None:
                self.ema.update()
            window.add(busy=time.perf_counter() - t0, data_wait=t1 - t0)
            self.step += 1
            progress.update(1)
            if self.step % self.loop.log_every == 0 or self.step == self.loop.steps:
                results.update(self._log_window(tracker, window, loss, metrics))
                progress.set_postfix(loss=f"{results['loss']:.3f}", lr=f"{results['lr']:.2e}")
                window = _Window()
            if self.step < self.loop.steps:
                results.update(self.evaluate(tracker, last=False))
                if self.loop.ckpt_every and self.step % self.loop.ckpt_every == 0:
                    self.save(tracker)
        progress.close()
        results.update(self.evaluate(tracker, last=True))
        if self.save_final:
            self.save(tracker)
        return results

    def _log_window(self, tracker: Tracker, window: "_Window", loss: float, metrics: dict[str, float]) -> dict[str, float]:
        """The step's loss and metrics averaged over ranks, and the window's speed."""
        keys = sorted(metrics)
        stats = torch.tensor([loss] + [metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(stats)
        stats /= self.dist_info.world_size
        samples_per_s = window.steps * self.global_batch / window.busy
        logged = {
            "loss": stats[0].item(), **{k: stats[i + 1].item() for i, k in enumerate(keys)},
            "lr": max(self.engine.get_lr()),
            "samples_per_s": samples_per_s,
            "step_time_s": window.busy / window.steps,
            "data_wait_fraction": window.data_wait / window.busy,
            "memory_bytes": memory_bytes(self.dist_info.device),
        }
        bad = getattr(self.data, "bad_counts", None)  # the shard stream counts what it skipped
        if bad is not None:
            logged |= {"bad_samples": sum(bad.values()), **{f"bad_samples/{k}": v for k, v in bad.items()}}
        if self.peak_flops and self.flops_per_sample:
            logged["mfu"] = mfu(samples_per_s, self.flops_per_sample, world_size=self.dist_info.world_size,
                                peak_flops=self.peak_flops)
        self.log(tracker, logged)
        return logged

    def close(self) -> None:
        self.checkpoint.close()


class _Window:
    """Time spent between two logs: in steps (with their data) and waiting for data."""

    def __init__(self):
        self.busy, self.data_wait, self.steps = 0.0, 0.0, 0

    def add(self, *, busy: float, data_wait: float) -> None:
        self.busy, self.data_wait, self.steps = self.busy + busy, self.data_wait + data_wait, self.steps + 1
