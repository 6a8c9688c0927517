"""Per-rank peak memory while building a ZeRO-3 engine (model, then optimizer state), with the
model built under deepspeed.zero.Init (ours, `engine.zero_init: true`) against built whole on
every rank and partitioned by `deepspeed.initialize` (the baseline, `engine.zero_init: false`).

Each variant is its own torchrun launch of 2 gloo ranks on the CPU (peak RSS only grows within
a process); each rank builds the softmax-xent objective over the model exactly as the trainer
does (`build_partitioned`, then `build_engine` with AdamW) and reports its peak resident set
(`ru_maxrss`), and how far it rose over the process before the build (imports, process group).

    python bench/zero_init_memory.py [--model vit_h14] [--precision fp32] [--repeats 1]

ViT-H/14 in fp32 is 2.5 GB of weights; with AdamW's state every rank reaches several GB (check
`free -g` first: both variants run one after the other, 2 ranks each; ViT-L/16 needs ~8 GiB).

Last line: RESULT zero_init_mem_ratio=<ours / baseline peak RSS over the whole build, worst rank,
median of repeats> model_mem_ratio=<the same once the model is built, before deepspeed.initialize>
model_rise_ratio=<the model's own memory: rise over the process's start, ours / baseline>.

What to expect: ZeRO-3's engine state per rank for fp32 + AdamW is about 5 x (parameters / ranks)
x 4 bytes (the partition, its fp32 flat copy, two moments, the gradient partition), the whole
model 1 x parameters x 4 bytes. zero.Init removes the whole model from each rank, so the peak
falls where the whole model is the larger: from about 6 ranks up (fp32), never on 2.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_and_measure(model: str, precision: str, zero_init: bool) -> None:
    """One rank of a launch: build the engine, print the ranks' peaks as one JSON line (rank 0)."""
    import psutil
    import torch
    import torch.distributed as dist

    from pretrain.config import EngineConfig, OptimConfig
    from pretrain.engine.distributed import init_distributed, shutdown
    from pretrain.engine.deepspeed_engine import build_engine, build_partitioned
    from pretrain.models import build_model
    from pretrain.objectives import build_objective

    info = init_distributed()
    before = psutil.Process().memory_info().rss
    engine = EngineConfig(zero_stage=3, precision=precision, zero_init=zero_init)
    torch.manual_seed(0)
    objective = build_partitioned(lambda: build_objective("softmax_xent", build_model(model, num_classes=1000)),
                                  engine, micro_batch=1)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    ds_engine = build_engine(objective, optim=OptimConfig(name="adamw"), engine=engine, micro_batch=1, total_steps=10)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = torch.tensor([peak, peak - before, built, built - before], dtype=torch.float64)
    gathered = [torch.zeros_like(stats) for _ in range(info.world_size)]
    dist.all_gather(gathered, stats)
    if info.is_main:
        keys = ("peak", "rise", "model_peak", "model_rise")
        print("MEASURE " + json.dumps({k: [g[i].item() for g in gathered] for i, k in enumerate(keys)}
                                      | {"params": sum(getattr(p, "ds_numel", p.numel()) for p in ds_engine.module.parameters())}))
    del ds_engine
    shutdown()


def launch(model: str, precision: str, zero_init: bool) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--worker", "--model", model, "--precision", precision, "--zero-init", str(int(zero_init))]
    # glibc returns allocations over 128 KiB to the OS when freed (mmap): RSS then follows what is
    # alive, not the heap's layout. Without it, the receive buffers of zero.Init's per-parameter
    # broadcast leave rank 1's heap fragmented by about the model's size (measured: ViT-L/16 rank 1
    # +0.7 GiB); the baseline runs under the same setting.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MEASURE ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("MEASURE "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_h14")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero-init", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return build_and_measure(args.model, args.precision, bool(args.zero_init))
    gib = 2**30
    got: dict[str, list[dict]] = {"baseline": [], "zero_init": []}
    for _ in range(args.repeats):
        for name, zero_init in (("baseline", False), ("zero_init", True)):
            one = launch(args.model, args.precision, zero_init)
            got[name].append(one)
            print(f"{name:<10} {args.model} ({one['params'] / 1e6:.0f}M params, {args.precision}), GiB per rank: "
                  f"peak {' / '.join(f'{p / gib:.2f}' for p in one['peak'])} (rise over start "
                  f"{' / '.join(f'{p / gib:.2f}' for p in one['rise'])}); after the model only "
                  f"{' / '.join(f'{p / gib:.2f}' for p in one['model_peak'])} (rise "
                  f"{' / '.join(f'{p / gib:.2f}' for p in one['model_rise'])})", flush=True)

    def ratio(key: str) -> float:  # worst rank, median over repeats
        return statistics.median(max(g[key]) for g in got["zero_init"]) / statistics.median(max(g[key]) for g in got["baseline"])

    print(f"RESULT zero_init_mem_ratio={ratio('peak'):.3f} model_mem_ratio={ratio('model_peak'):.3f} "
          f"model_rise_ratio={ratio('model_rise'):.3f}")


if __name__ == "__main__":
    main()
