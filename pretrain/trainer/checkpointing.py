"""Everything that resumes, behind one object (torchtitan's CheckpointManager over `Stateful`s).

The engine (model, optimizer, lr schedule: DeepSpeed's own files), the sharded EMA and each
rank's RNG are written by `pretrain.checkpoint.checkpointer.Checkpointer`, locally and to the S3 mirror;
every other `Stateful` (the data stream, ...) goes into the checkpoint's `meta.json` under its
name, beside the run's config and MLflow run id. A task never touches checkpoint files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from data_pipeline import storage
from pretrain.checkpoint.checkpointer import Checkpointer, ResumePoint
from pretrain.engine.ema import ShardedEMA


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainCheckpoint:
    """`states`: name -> Stateful, saved as JSON in meta.json; `config`: the run's config, kept beside."""

    def __init__(self, output_dir: str | Path, *, keep_last: int, rank: int, world_size: int, remote_uri: str | None,
                 states: dict[str, Stateful], config: dict[str, Any]):
        self.checkpointer = Checkpointer(Path(output_dir) / "checkpoints", keep_last=keep_last, rank=rank, world_size=world_size,
                                         remote_uri=storage.join_url(remote_uri, "checkpoints") if remote_uri else None)
        self.states, self.config = states, config

    @property
    def root(self) -> Path:
        return self.checkpointer.root

    def prepare(self) -> ResumePoint | None:
        """Collective, before the engine is built (a checkpoint from another world size needs
        `load_universal`): the latest checkpoint, local or downloaded from the mirror, or None."""
        return self.checkpointer.prepare_resume()

    def load(self, ds_engine, point: ResumePoint, *, ema: ShardedEMA | None) -> None:
        self.checkpointer.load(ds_engine, point, ema=ema)
        for name, state in self.states.items():
            state.load_state_dict(point.meta[name])

    def save(self, ds_engine, *, step: int, run_id: str | None, ema: ShardedEMA | None) -> Path:
        """Collective; rank 0's meta is the one kept (only it knows the MLflow run id)."""
        meta = [{"config": self.config, "run_id": run_id, **{name: s.state_dict() for name, s in self.states.items()}}]
        dist.broadcast_object_list(meta, src=0)
        return self.checkpointer.save(ds_engine, step=step, meta=meta[0], ema=ema)

    def close(self) -> None:
        """Wait for the last upload to the mirror."""
        self.checkpointer.close()
