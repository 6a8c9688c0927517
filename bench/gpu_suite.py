"""The GPU figures in one run (called by bench/gpu_suite.sh; see there).

    python bench/gpu_suite.py [--dry-run] [--results bench/RESULTS.md]

Figures, each through the trainer's own code (build_partitioned, build_engine, compile_blocks,
train_step, build_loader, normalize_batch) on synthetic uint8 batches:
  train/<model>/<eager|compiled>  samples/s and MFU of bf16 training steps, ViT-B/16, L/16, H/14
  loader_vs_demand                 the loader's samples/s (all CPU cores, JPEG shards) over the
                                   samples/s ViT-B/16's compiled step consumes (>= 1: never starved)
  mae_speedup                      bench/mae_speedup.py on ViT-L/16 (MAE vs full-token step)
  zero3_vs_zero2                   ViT-L/16 step time at ZeRO-3 over ZeRO-2 (one rank)

On a GPU each figure is appended to --results as a dated row. --dry-run runs the same code on
the CPU with tiny models, fp32, 2 steps and torch.compile's eager backend (dynamo traces, no
code generation), and writes no rows: its figures are printed, marked dry-run.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.decode import normalize_batch  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from pretrain.config import EngineConfig, OptimConfig  # noqa: E402
from pretrain.engine.distributed import init_distributed, shutdown  # noqa: E402
from pretrain.engine.deepspeed_engine import build_engine, build_partitioned, compile_blocks, train_step  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.objectives import build_objective  # noqa: E402
from pretrain.engine.perf import device_peak_flops, fused_attention, mfu, train_flops_per_sample  # noqa: E402


@dataclass(frozen=True)
class Suite:
    models: tuple[tuple[str, str, int, int], ...]  # (label, registry name, image size, micro-batch)
    precision: str
    steps: int
    warmup: int
    compile_backend: str
    mae_args: tuple[str, ...]
    loader_batches: int


GPU = Suite(models=(("vit_b16", "vit_b16", 224, 128), ("vit_l16", "vit_l16", 224, 64), ("vit_h14", "vit_h14", 224, 32)),
            precision="bf16", steps=20, warmup=5, compile_backend="inductor",
            mae_args=("--model", "vit_l16", "--batch", "128", "--repeats", "10", "--warmup", "3"), loader_batches=40)
DRY = Suite(models=(("vit_b16", "vit_demo", 28, 4), ("vit_l16", "vit_g14_demo", 32, 4), ("vit_h14", "vit_22b_demo", 32, 4)),
            precision="fp32", steps=2, warmup=1, compile_backend="eager",
            mae_args=("--model", "vit_demo", "--batch", "2", "--repeats", "1", "--warmup", "0", "--decoder-dim", "32",
                      "--decoder-depth", "1", "--decoder-heads", "2"), loader_batches=3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_speed(name: str, image_size: int, batch: int, suite: Suite, device: torch.device, *, compiled: bool,
                zero_stage: int = 2) -> dict[str, float]:
    """samples/s (and MFU where the device's peak is known) of `suite.steps` training steps."""
    engine = EngineConfig(zero_stage=zero_stage, precision=suite.precision)
    torch.manual_seed(0)
    objective = build_partitioned(lambda: build_objective("softmax_xent", build_model(name, num_classes=1000, img_size=image_size)),
                                  engine, micro_batch=batch)
    flops = train_flops_per_sample(objective, image_size)
    ds_engine = build_engine(objective, optim=OptimConfig(name="adamw"), engine=engine, micro_batch=batch,
                             total_steps=suite.steps + suite.warmup)
    if compiled:
        compile_blocks(ds_engine.module, backend=suite.compile_backend)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8)
    targets = torch.randint(0, 1000, (batch,))

    def step() -> None:
        train_step(ds_engine, [(normalize_batch(images, (0.5,) * 3, (0.5,) * 3, device=device), targets)])

    for _ in range(suite.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(suite.steps):
        step()
    sync(device)
    samples_per_s = suite.steps * batch / (time.perf_counter() - start)
    peak = device_peak_flops(device, suite.precision)
    out = {"samples_per_s": samples_per_s, "step_s": batch / samples_per_s, "fused_attn": float(fused_attention(objective))}
    if peak:
        out["mfu"] = mfu(samples_per_s, flops, world_size=1, peak_flops=peak)
    del ds_engine, objective
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def loader_speed(suite: Suite, image_size: int, batch: int) -> float:
    """samples/s of our loader over JPEG shards (sklearn's sample photos, no download), all cores."""
    from data_pipeline.sample import Sample
    from data_pipeline.writer import write_split
    from data_throughput import photo_patches

    workers = 1 if suite is DRY else max(1, (os.cpu_count() or 2) - 1)
    n = batch * (suite.loader_batches + 2 * workers + 2)
    with tempfile.TemporaryDirectory() as root:
        write_split((Sample(f"img_{i:06d}", data, "jpg", i % 2) for i, data in enumerate(photo_patches(n))), root,
                    prefix="train", samples_per_shard=max(batch, n // 16))
        cfg = DataConfig(train_urls=f"{root}/train-*.tar", batch_size=batch, num_workers=workers, image_size=image_size,
                         num_classes=2, augment="inception", normalize="imagenet")
        urls = f"{root}/train-{{000000..{len(list(Path(root).glob('train-*.tar'))) - 1:06d}}}.tar"
        batches = iter(build_loader(cfg, rank=0, world_size=1, urls=urls, train=True))
        for _ in range(2 * workers):  # workers started, their first batches queued
            next(batches)
        start = time.perf_counter()
        for _ in range(suite.loader_batches):
            next(batches)
        return suite.loader_batches * batch / (time.perf_counter() - start)


def mae_speedup(suite: Suite) -> float:
    proc = subprocess.run([sys.executable, str(BENCH / "mae_speedup.py"), *suite.mae_args], capture_output=True, text=True, timeout=600)
    found = re.search(r"RESULT mae_speedup=([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"bench/mae_speedup.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return float(found.group(1))


def measure(suite: Suite, device: torch.device) -> list[tuple[str, str]]:
    figures: list[tuple[str, str]] = []
    runs: dict[str, dict[str, float]] = {}
    for label, name, size, batch in suite.models:
        for mode in ("eager", "compiled"):
            got = runs[f"{label}/{mode}"] = train_speed(name, size, batch, suite, device, compiled=mode == "compiled")
            mfu_text = f" mfu={got['mfu']:.3f}" if "mfu" in got else ""
            figures.append((f"train/{label}/{mode}", f"samples_per_s={got['samples_per_s']:.1f}{mfu_text} "
                                                    f"fused_attn={bool(got['fused_attn'])}"))
            print(figures[-1], flush=True)
    _, name, size, batch = suite.models[0]
    ceiling, demand = loader_speed(suite, size, batch), runs["vit_b16/compiled"]["samples_per_s"]
    figures.append(("loader_vs_demand", f"ratio={ceiling / demand:.2f} loader_samples_per_s={ceiling:.1f} "
                                        f"vit_b16_step_samples_per_s={demand:.1f}"))
    figures.append(("mae_speedup", f"mae_speedup={mae_speedup(suite):.2f}"))
    _, name, size, batch = suite.models[1]
    zero2 = runs["vit_l16/eager"]["step_s"]  # the eager row ran at ZeRO-2
    zero3 = train_speed(name, size, batch, suite, device, compiled=False, zero_stage=3)["step_s"]
    figures.append(("zero3_vs_zero2", f"ratio={zero3 / zero2:.2f} zero2_step_s={zero2:.4f} zero3_step_s={zero3:.4f}"))
    return figures


def append_rows(results: Path, device_name: str, figures: list[tuple[str, str]]) -> None:
    today = datetime.date.today().isoformat()
    rows = "".join(f"| {today} | {device_name} | `bench/gpu_suite.sh` {figure} | `{value}` | see README |\n" for figure, value in figures)
    with results.open("a") as f:
        f.write(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, a few steps; writes no rows")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()
    info = init_distributed()
    if info.device.type != "cuda" and not args.dry_run:
        raise SystemExit("bench/gpu_suite.sh needs a CUDA device; --dry-run runs the same code on the CPU")
    suite = DRY if args.dry_run else GPU
    try:
        figures = measure(suite, info.device)
    finally:
        shutdown()
    device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "CPU"
    for figure, value in figures:
        print(f"{'DRY-RUN ' if args.dry_run else ''}{figure}: {value}")
    if not args.dry_run:
        append_rows(args.results, device_name, figures)
        print(f"appended {len(figures)} rows to {args.results}")


if __name__ == "__main__":
    main()
