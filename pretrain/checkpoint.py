"""Checkpoints that survive a kill: DeepSpeed state plus everything else that must resume.

Layout under `<output_dir>/checkpoints/`:
  step000100/            DeepSpeed's files, `meta.json` (step, config, data stream state),
                         `rng_rank<r>.json` (each rank's RNG states)
  latest                 the tag of the newest complete checkpoint
A checkpoint is written as `.tmp-<tag>/`, renamed once every rank has finished, and only then
named in `latest` (itself written to a temp file and renamed). The last `keep_last` stay.
Assumes a file system shared by all nodes, as Slurm clusters have.
"""
from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.storage import write_atomic

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


class Checkpointer:
    def __init__(self, root: str | Path, *, keep_last: int, rank: int):
        self.root, self.keep_last, self.rank = Path(root), keep_last, rank

    def latest_tag(self) -> str | None:
        path = self.root / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.root / tag / "meta.json").is_file():
            raise FileNotFoundError(f"{path} names {tag!r} but {self.root / tag} is incomplete")
        return tag

    def save(self, ds_engine, *, step: int, meta: dict[str, Any]) -> Path:
        tag = f"step{step:08d}"
        tmp_tag = f".tmp-{tag}"
        if self.rank == 0:
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
        dist.barrier()
        ds_engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        write_atomic(self.root / tmp_tag / f"rng_rank{self.rank}.json", json.dumps(rng_state()).encode())
        dist.barrier()
        if self.rank == 0:
            write_atomic(self.root / tmp_tag / "meta.json", json.dumps({**meta, "step": step, "tag": tag}, indent=1).encode())
            shutil.rmtree(self.root / tag, ignore_errors=True)
            os.replace(self.root / tmp_tag, self.root / tag)
            write_atomic(self.root / LATEST, tag.encode())
            self._prune()
        dist.barrier()
        return self.root / tag

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.root.glob("step*") if p.is_dir())
        for old in tags[: -self.keep_last]:
            shutil.rmtree(self.root / old, ignore_errors=True)

    def load(self, ds_engine) -> dict[str, Any] | None:
        """Restore the latest checkpoint into `ds_engine`; returns its meta, or None if none exists."""
        tag = self.latest_tag()
        if tag is None:
            return None
        meta = json.loads((self.root / tag / "meta.json").read_text())
        path, _ = ds_engine.load_checkpoint(str(self.root), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        rng_file = self.root / tag / f"rng_rank{self.rank}.json"
        if rng_file.is_file():  # absent when resuming on more ranks than saved
            set_rng_state(json.loads(rng_file.read_text()))
        return meta
