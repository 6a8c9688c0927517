"""Our DeepSpeed engine against a plain PyTorch DDP loop, and ZeRO's memory per rank.

    python bench/engine_overhead.py [--steps 8] [--nproc 2] [--precision bf16|fp32]

1. Step time, ViT-Ti/16 at 224 px, micro-batch 16 per rank, 2 ranks, bf16: our engine
   (`pretrain.engine.deepspeed_engine.train_step` at ZeRO-2: DeepSpeed's bf16 optimizer with fp32 master,
   clipping at 1) against DDP + `torch.autocast(bfloat16)` + clipping + AdamW, on the same
   batches. Steps alternate between the two, so a busy machine slows both alike; medians.
   Goal: ours / DDP <= 1.05. `--precision fp32` compares fp32 to fp32 instead, for CPUs
   without bf16 arithmetic (there bf16 is emulated, ~2 min per step).
2. Parameter + optimizer-state bytes held by one rank at ZeRO-0/1/2/3 on 2 ranks (fp32
   training, so ZeRO-0 is plain replication): the module's weights as this rank holds them
   (ZeRO-3: its partition) plus every tensor of the optimizer (fp32 master partitions,
   Adam moments), each storage counted once. Goal: ZeRO-3 <= 0.55 x ZeRO-0.
3. On a GPU: ViT-L/16 bf16 samples/s and MFU of our engine (ZeRO-2, micro-batch 64 per GPU,
   every GPU of the machine), peak FLOP/s from pretrain.engine.perf's table.

Re-launches itself under torchrun when not started by a launcher. The last line is
`RESULT step_overhead=<x> zero3_mem_ratio=<y>` (plus vit_l16_samples_per_s and vit_l16_mfu
on a GPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - t0


def build(name: str, device, **kwargs):
    from pretrain.models import build_model
    from pretrain.objectives import build_objective

    torch.manual_seed(0)
    return build_objective("softmax_xent", build_model(name, num_classes=1000, **kwargs)).to(device)


def engine(objective, *, stage: int, precision: str, micro: int):
    from pretrain.config import EngineConfig, OptimConfig
    from pretrain.engine.deepspeed_engine import build_engine

    return build_engine(objective, optim=OptimConfig(lr=1e-4, weight_decay=0.05, decay="constant"),
                        engine=EngineConfig(zero_stage=stage, precision=precision, grad_clip=1.0),
                        micro_batch=micro, grad_accum_steps=1, total_steps=1000)


def step_overhead(info, *, steps: int, precision: str, micro: int = 16) -> tuple[float, float, float]:
    """Median step seconds of our engine and of DDP, alternating, on the same batches."""
    from torch.nn.parallel import DistributedDataParallel

    from pretrain.engine.deepspeed_engine import train_step

    g = torch.Generator().manual_seed(1 + info.rank)
    batches = [(torch.randn(micro, 3, 224, 224, generator=g), torch.randint(0, 1000, (micro,), generator=g)) for _ in range(4)]
    ours = engine(build("vit_ti16", info.device), stage=2, precision=precision, micro=micro)
    plain = build("vit_ti16", info.device)
    ddp = DistributedDataParallel(plain, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.05)

    def ddp_step(images, targets):
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = ddp(images.to(info.device), targets.to(info.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # train_step reads its loss too

    times: dict[str, list[float]] = {"ours": [], "ddp": []}
    for i in range(steps + 2):  # 2 warm-up steps each
        batch = batches[i % len(batches)]
        t_ours = timed(lambda: train_step(ours, [batch]))
        t_ddp = timed(lambda: ddp_step(*batch))
        if i >= 2:
            times["ours"].append(t_ours)
            times["ddp"].append(t_ddp)
        if info.is_main:
            print(f"  step {i}: ours {t_ours:.3f} s, ddp {t_ddp:.3f} s", flush=True)
    ours_s, ddp_s = statistics.median(times["ours"]), statistics.median(times["ddp"])
    return ours_s, ddp_s, ours_s / ddp_s


def held_bytes(ds_engine) -> int:
    """Bytes of the weights as this rank holds them plus all optimizer tensors, storages counted once."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for p in ds_engine.module.parameters():
        add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    base = ds_engine.optimizer
    while hasattr(base, "optimizer"):  # DeepSpeed's ZeRO wrappers hold the torch optimizer
        base = base.optimizer
    for group in base.param_groups:
        for p in group["params"]:
            add(p.data)
    for state in base.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                add(value)
    return sum(seen.values())


def zero_memory(info, *, micro: int = 2) -> dict[int, int]:
    from pretrain.engine.deepspeed_engine import train_step

    out = {}
    images, targets = torch.randn(micro, 3, 224, 224), torch.randint(0, 1000, (micro,))
    for stage in (0, 1, 2, 3):
        ds = engine(build("vit_ti16", info.device), stage=stage, precision="fp32", micro=micro)
        train_step(ds, [(images, targets)])  # Adam's moments exist after the first step
        out[stage] = held_bytes(ds)
        if info.is_main:
            print(f"  ZeRO-{stage}: {out[stage] / 2**20:.1f} MiB per rank", flush=True)
        del ds
    return out


def vit_l16_throughput(info, *, steps: int, micro: int = 64) -> tuple[float, float | None]:
    from pretrain.engine.deepspeed_engine import train_step
    from pretrain.engine.perf import device_peak_flops, mfu, train_flops_per_sample

    objective = build("vit_l16", info.device)
    flops = train_flops_per_sample(objective, 224)
    ours = engine(objective, stage=2, precision="bf16", micro=micro)
    g = torch.Generator().manual_seed(info.rank)
    batch = (torch.randn(micro, 3, 224, 224, generator=g), torch.randint(0, 1000, (micro,), generator=g))
    times = [timed(lambda: train_step(ours, [batch])) for _ in range(steps + 3)][3:]
    samples_per_s = micro * info.world_size / statistics.median(times)
    peak = device_peak_flops(info.device, "bf16")
    return samples_per_s, mfu(samples_per_s, flops, world_size=info.world_size, peak_flops=peak) if peak else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per loop (after 2 warm-up steps)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="of the step-time comparison")
    parser.add_argument("--nproc", type=int, default=None, help="ranks when launching itself (default 2; 1 on a 1-GPU machine)")
    args = parser.parse_args()
    if args.nproc is None:
        args.nproc = 1 if torch.cuda.device_count() == 1 else 2
    if "RANK" not in os.environ:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--steps", str(args.steps), "--precision", args.precision]
        sys.exit(subprocess.call(cmd, env=env))

    from pretrain.engine.distributed import init_distributed, print0, shutdown

    info = init_distributed()
    try:
        print0(f"step time, ViT-Ti/16 224 px, micro-batch 16 x {info.world_size} ranks, {args.precision}, on {info.device.type}:")
        ours_s, ddp_s, overhead = step_overhead(info, steps=args.steps, precision=args.precision)
        print0(f"  median: ours (ZeRO-2) {ours_s:.3f} s, DDP {ddp_s:.3f} s, ratio {overhead:.3f} (goal <= 1.05)")
        print0(f"parameter + optimizer bytes per rank, ViT-Ti/16, fp32, {info.world_size} ranks:")
        memory = zero_memory(info)
        ratio = memory[3] / memory[0]
        print0(f"  ZeRO-3 / ZeRO-0 = {ratio:.3f} (goal <= 0.55)")
        result = f"RESULT step_overhead={overhead:.3f} zero3_mem_ratio={ratio:.3f}"
        if info.device.type == "cuda":
            samples_per_s, utilisation = vit_l16_throughput(info, steps=args.steps)
            mfu_text = f"{utilisation:.3f}" if utilisation is not None else "nan"
            print0(f"ViT-L/16 bf16 ZeRO-2, micro-batch 64 x {info.world_size} GPUs: {samples_per_s:.1f} samples/s, MFU {mfu_text} (goal >= 0.5)")
            result += f" vit_l16_samples_per_s={samples_per_s:.1f} vit_l16_mfu={mfu_text}"
        print0(result)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
