"""Exponential moving average of the weights, sharded over the ranks, in any ZeRO stage.

Each rank keeps, in fp32, the slice [r*s, (r+1)*s) with s = ceil(n/W) of every flattened
parameter of n elements. Under ZeRO-3 that slice is exactly the rank's own partition
(`param.ds_tensor`, DeepSpeed pads every parameter to a multiple of W and splits it
evenly); under ZeRO-0/1/2 every rank holds the whole weights and takes the same slice.
So updates need no communication, memory is 1/W of a full copy per rank, and checkpoints
have one layout: `ema_rank<r>.safetensors` per rank plus `ema.json` (world size, shapes,
update count). A resume on another number of ranks re-slices from the saved files.
The average follows the weights the model computes with (bf16 under bf16). Buffers
(BatchNorm's running statistics, as in PerViT's stem) are not averaged but copied from the
model at each save into `ema_buffers.safetensors` (rank 0's, as timm's ModelEmaV3 copies
them by default), so the exported `model_ema` is a whole model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data_pipeline.storage import atomic_path, write_atomic

META = "ema.json"
BUFFERS = "ema_buffers.safetensors"


def persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers a state dict holds (non-persistent ones, such as cached masks, left out)."""
    return [(f"{prefix}.{name}" if prefix else name, buf) for prefix, mod in module.named_modules()
            for name, buf in mod._buffers.items() if buf is not None and name not in mod._non_persistent_buffers_set]


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    size = math.ceil(numel / world_size)
    return min(rank * size, numel), min((rank + 1) * size, numel)


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"ema_rank{rank:05d}.safetensors"


class ShardedEMA:
    def __init__(self, module: nn.Module, *, decay: float, warmup: bool, rank: int, world_size: int):
        self.decay, self.warmup, self.rank, self.world_size = decay, warmup, rank, world_size
        self.params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.buffers = persistent_buffers(module)
        # ZeRO-3 keeps the full shape in ds_shape; the tensor itself is an empty placeholder.
        self.shapes = {name: list(getattr(p, "ds_shape", p.shape)) for name, p in self.params}
        self.updates = 0
        self.shadow = {name: self._local(p).float().clone() for name, p in self.params}

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        partition = getattr(param, "ds_tensor", None)
        numel = param.ds_numel if partition is not None else param.numel()
        start, end = shard_range(numel, self.rank, self.world_size)
        if partition is not None:
            return partition.data.view(-1)[: end - start]
        return param.data.view(-1)[start:end]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """After each optimizer step."""
        weight = 1.0 - self.current_decay()
        for name, p in self.params:
            self.shadow[name].lerp_(self._local(p).float(), weight)
        self.updates += 1

    def save(self, folder: str | Path) -> None:
        """Every rank writes its slices; rank 0 the buffers and the metadata."""
        folder = Path(folder)
        with atomic_path(_rank_file(folder, self.rank)) as tmp:
            save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(tmp))
        if self.rank == 0:
            if self.buffers:
                with atomic_path(folder / BUFFERS) as tmp:
                    save_file({k: v.detach().cpu().contiguous() for k, v in self.buffers}, str(tmp))
            meta = {"world_size": self.world_size, "updates": self.updates, "decay": self.decay, "shapes": self.shapes}
            write_atomic(folder / META, json.dumps(meta).encode())

    def load(self, folder: str | Path) -> None:
        """Restore from a checkpoint saved on any number of ranks."""
        folder = Path(folder)
        meta = json.loads((folder / META).read_text())
        if set(meta["shapes"]) != set(self.shapes):
            raise KeyError(f"{folder / META} averages other parameters than this model: "
                           f"missing {sorted(set(self.shapes) - set(meta['shapes']))[:5]}")
        for name, flat in _iter_full(folder, meta):
            start, end = shard_range(flat.numel(), self.rank, self.world_size)
            self.shadow[name] = flat[start:end].clone()
        self.updates = meta["updates"]


def _iter_full(folder: Path, meta: dict):
    """(name, full flat fp32 tensor) one parameter at a time, from the per-rank files."""
    files = [_rank_file(folder, r) for r in range(meta["world_size"])]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"EMA checkpoint {folder} lacks {missing}: saved by {meta['world_size']} ranks")
    handles = [safe_open(str(f), framework="pt") for f in files]
    for name in meta["shapes"]:
        yield name, torch.cat([h.get_tensor(name) for h in handles])


def has_ema(folder: str | Path) -> bool:
    return (Path(folder) / META).is_file()


def consolidated_ema(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full averaged weights, {name: tensor} in their shapes, and the model's buffers."""
    folder = Path(folder)
    if not has_ema(folder):
        raise FileNotFoundError(f"{folder} holds no EMA weights: train with `train.ema` set")
    meta = json.loads((folder / META).read_text())
    buffers = load_file(str(folder / BUFFERS)) if (folder / BUFFERS).is_file() else {}
    return {**buffers, **{name: flat.view(meta["shapes"][name]) for name, flat in _iter_full(folder, meta)}}
