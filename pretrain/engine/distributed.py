"""Distributed start: the one place that reads launcher variables.

Works under torchrun, the `deepspeed` launcher and `accelerate launch` (all set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), under `srun` (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID; the sbatch script exports MASTER_ADDR/PORT), and as one
plain process. gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def init_distributed() -> DistInfo:
    """Join the process group (DeepSpeed needs one even for a single process)."""
    rank, local_rank, world_size = _launcher_env()
    if world_size > 1 and "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            f"rank {rank} of {world_size} has no MASTER_ADDR: launch with torchrun, deepspeed, "
            "accelerate launch, or export MASTER_ADDR/MASTER_PORT before srun (see launch/slurm_pretrain.sh)"
        )
    # DeepSpeed reads these names whatever launched us.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", str(world_size)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))

    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend)


def shutdown() -> None:
    """Without this, gloo runs abort at exit now and then."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)
