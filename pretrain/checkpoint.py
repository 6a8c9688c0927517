"""Checkpoints that survive a kill: DeepSpeed state plus everything else that must resume.

Layout under `<output_dir>/checkpoints/`:
  step000100/            DeepSpeed's files, `meta.json` (step, config, data stream state,
                         world size, MLflow run id), `rng_rank<r>.json` (each rank's RNG
                         states), `ema_rank<r>.safetensors` + `ema.json` with `train.ema`
  step000100/universal/  DeepSpeed's universal form of it, made on a resume with another
                         number of ranks (ZeRO's optimizer partitions depend on it)
  latest                 the tag of the newest complete checkpoint
A checkpoint is written as `.tmp-<tag>/`, renamed once every rank has finished, and only then
named in `latest` (itself written to a temp file and renamed). The last `keep_last` stay.
Assumes a file system shared by all nodes, as Slurm clusters have. With a remote URI
(`s3://bucket/run/checkpoints`) rank 0 uploads each finished checkpoint in the background
(then `latest`), keeps the last `keep_last` there too, and a resume on a machine without the
local folder starts from the remote `latest`.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import random
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.storage import write_atomic
from pretrain import remote
from pretrain.ema import ShardedEMA, has_ema

LATEST = "latest"
UNIVERSAL = "universal"


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


def has_partitioned_optimizer(folder: Path) -> bool:
    """ZeRO-1/2/3 (and bf16 at stage 0) split the optimizer state into one file per rank."""
    return any(folder.glob("*optim_states.pt"))


def to_universal(folder: Path) -> Path:
    """Convert the DeepSpeed checkpoint in `folder` to `folder/universal` (DeepSpeed's
    ds_to_universal, in this process), which loads on any number of ranks."""
    from deepspeed.checkpoint import ds_to_universal

    out, tmp = folder / UNIVERSAL, folder / f".tmp-{UNIVERSAL}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it narrates every step
        ds_to_universal.main(args)
    os.replace(tmp, out)
    return out


@dataclass(frozen=True)
class ResumePoint:
    tag: str
    meta: dict[str, Any]
    universal: bool  # saved on another number of ranks: load the universal form

    @property
    def step(self) -> int:
        return self.meta["step"]


class Checkpointer:
    def __init__(self, root: str | Path, *, keep_last: int, rank: int, world_size: int, remote_uri: str | None = None):
        self.root, self.keep_last, self.rank, self.world_size = Path(root), keep_last, rank, world_size
        self.remote_uri = remote_uri
        self._upload: threading.Thread | None = None
        self._upload_error: BaseException | None = None

    def latest_tag(self) -> str | None:
        path = self.root / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.root / tag / "meta.json").is_file():
            raise FileNotFoundError(f"{path} names {tag!r} but {self.root / tag} is incomplete")
        return tag

    # -- saving ---------------------------------------------------------------------------
    def save(self, ds_engine, *, step: int, meta: dict[str, Any], ema: ShardedEMA | None = None) -> Path:
        """Collective: every rank writes its part, rank 0 completes the checkpoint."""
        tag = f"step{step:08d}"
        tmp_tag = f".tmp-{tag}"
        if self.rank == 0:
            self._wait_upload()  # the previous checkpoint may still be uploading
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
        dist.barrier()
        ds_engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        write_atomic(self.root / tmp_tag / f"rng_rank{self.rank}.json", json.dumps(rng_state()).encode())
        if ema is not None:
            ema.save(self.root / tmp_tag)
        dist.barrier()
        if self.rank == 0:
            meta = {**meta, "step": step, "tag": tag, "world_size": self.world_size}
            write_atomic(self.root / tmp_tag / "meta.json", json.dumps(meta, indent=1).encode())
            old = self.root / f".old-{tag}"  # a re-save of the same step (a resume that trained no step)
            if (self.root / tag).exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.root / tag, old)
            os.replace(self.root / tmp_tag, self.root / tag)
            write_atomic(self.root / LATEST, tag.encode())
            shutil.rmtree(old, ignore_errors=True)
            self._prune()
            if self.remote_uri:
                self._start_upload(tag)
        dist.barrier()
        return self.root / tag

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.root.glob("step*") if p.is_dir())
        for old in tags[: -self.keep_last]:
            shutil.rmtree(self.root / old, ignore_errors=True)

    def _start_upload(self, tag: str) -> None:
        def work() -> None:
            try:
                remote.upload_dir(self.root / tag, remote.join(self.remote_uri, tag),
                                  skip=lambda rel: rel.split("/")[0] in (UNIVERSAL, f".tmp-{UNIVERSAL}"))
                remote.write_text(remote.join(self.remote_uri, LATEST), tag)
                stored = [t for t in remote.list_folders(self.remote_uri) if t.startswith("step")]
                for old in stored[: -self.keep_last]:
                    remote.delete_folder(remote.join(self.remote_uri, old))
            except BaseException as err:  # raised in the training thread at the next wait
                self._upload_error = err

        self._upload = threading.Thread(target=work, name=f"upload-{tag}", daemon=True)
        self._upload.start()

    def _wait_upload(self) -> None:
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._upload_error is not None:
            err, self._upload_error = self._upload_error, None
            raise RuntimeError(f"uploading a checkpoint to {self.remote_uri} failed: {err}") from err

    def close(self) -> None:
        """Wait for the last upload (rank 0); call before the process exits."""
        if self.rank == 0:
            self._wait_upload()

    # -- resuming -------------------------------------------------------------------------
    def _fetch_remote(self) -> None:
        tag = remote.read_text(remote.join(self.remote_uri, LATEST))
        if tag is None:
            return
        tag = tag.strip()
        remote.download_dir(remote.join(self.remote_uri, tag), self.root / tag)
        write_atomic(self.root / LATEST, tag.encode())
        print(f"downloaded checkpoint {tag} from {self.remote_uri}", flush=True)

    def prepare_resume(self) -> ResumePoint | None:
        """Collective, before the engine is built: find the latest checkpoint (downloading it from
        the remote URI when the local folder has none) and, when it was saved on another number of
        ranks, convert it to DeepSpeed's universal form (once; kept beside it)."""
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.remote_uri and not (self.root / LATEST).is_file():
                self._fetch_remote()
        dist.barrier()
        tag = self.latest_tag()
        if tag is None:
            return None
        folder = self.root / tag
        meta = json.loads((folder / "meta.json").read_text())
        universal = meta["world_size"] != self.world_size and has_partitioned_optimizer(folder)
        if universal and self.rank == 0 and not (folder / UNIVERSAL).is_dir():
            print(f"converting {tag} (saved on {meta['world_size']} ranks) for {self.world_size} ranks", flush=True)
            to_universal(folder)
        dist.barrier()
        return ResumePoint(tag, meta, universal)

    def load(self, ds_engine, point: ResumePoint, *, ema: ShardedEMA | None = None) -> None:
        """Restore `point` into `ds_engine` (built with load_universal=point.universal) and `ema`."""
        folder = self.root / point.tag
        if point.universal:
            path, _ = ds_engine.load_checkpoint(str(folder), tag=UNIVERSAL)
        else:
            path, _ = ds_engine.load_checkpoint(str(self.root), tag=point.tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
        rng_file = folder / f"rng_rank{self.rank}.json"
        if rng_file.is_file():  # absent when resuming on more ranks than saved
            set_rng_state(json.loads(rng_file.read_text()))
        if ema is not None:
            if has_ema(folder):
                ema.load(folder)
            elif self.rank == 0:
                print(f"{folder} holds no EMA weights: the average starts from the resumed weights", flush=True)
