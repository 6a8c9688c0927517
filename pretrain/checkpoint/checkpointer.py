"""Checkpoints that survive a kill: DeepSpeed state plus everything else that must resume.

Layout under `<output_dir>/checkpoints/`:
  step000100/            DeepSpeed's files, `meta.json` (step, config, data stream state,
                         world size, MLflow run id), `rng_rank<r>.json` (each rank's RNG
                         states), `ema_rank<r>.safetensors` + `ema.json` with `train.ema`
  step000100/universal/  DeepSpeed's universal form of it, made on a resume with another
                         number of ranks (ZeRO's optimizer partitions depend on it)
  latest                 the tag of the newest complete checkpoint
A checkpoint is written as `.tmp-<tag>/`, fsynced and renamed once every rank has finished,
and only then named in `latest` (itself written to a temp file, fsynced and renamed): after a
kill, a full disk or a node crash `latest` names the previous complete checkpoint. The last
`keep_last` stay. `meta.json` holds a sha256 manifest of the checkpoint's files: DeepSpeed,
ds_to_universal and zero_to_fp32 unpickle them, so a resume (and an export) checks every file
against it before anything is loaded and refuses a mismatch, naming the file. Assumes a file
system shared by all nodes, as Slurm clusters have. With a remote URI
(`s3://bucket/run/checkpoints`, checked writable at start) rank 0 uploads each finished
checkpoint in the background (then `latest`), keeps the last `keep_last` there too, and a
resume on a machine without the local folder downloads the remote `latest`: the files its
manifest names, nothing else.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline import storage
from data_pipeline.storage import fsync_tree, replace_durably, safe_join, write_atomic
from pretrain.engine.ema import ShardedEMA, has_ema
from pretrain.tracking.redaction import redact

log = logging.getLogger(__name__)

LATEST = "latest"
UNIVERSAL = "universal"
META = "meta.json"
# A background upload that fails (the store restarting, a network cut) is tried again after
# 1, 2, 4, 8, 16 s: about half a minute. Each try sends only what the store does not hold.
UPLOAD_TRIES = 6
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def checked_tag(tag: str, source: str) -> str:
    """A checkpoint tag read from `source` (a `latest` file or object): one plain folder name."""
    tag = tag.strip()
    if not _TAG.fullmatch(tag) or tag in (".", ".."):
        raise ValueError(f"{source} names {tag!r}, not a checkpoint folder name; refusing it "
                         "(a tag never holds '/' or '..'): check who wrote it")
    return tag


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """The checkpoint's files by relative path (meta.json and the universal form aside)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META
            and p.relative_to(folder).parts[0] not in (UNIVERSAL, f".tmp-{UNIVERSAL}")}


def _sha256s(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(4) as pool:  # hashlib releases the GIL
        return list(pool.map(sha256_file, paths))


def manifest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of the checkpoint's files."""
    files = _files(folder)
    return dict(zip(files, _sha256s(list(files.values()))))


def verify_files(folder: Path, meta: dict[str, Any], names: list[str] | None = None) -> None:
    """Check `names` (default: every file the manifest lists, and that there is no other)
    against the manifest in `meta`, before anything unpickles them."""
    expected = meta.get("files")
    if expected is None:
        raise ValueError(f"{folder / META} has no file manifest (written before vitscale recorded one): "
                         "its files cannot be checked before they are unpickled; refusing it")
    if names is None:
        names = sorted(expected)
        stray = sorted(set(_files(folder)) - set(expected))
        if stray:
            raise ValueError(f"{folder} holds {stray[:3]}, which its manifest does not list: refusing the checkpoint")
    paths = [safe_join(folder, name) for name in names]
    for name, path in zip(names, paths):
        if name not in expected or not path.is_file():
            raise FileNotFoundError(f"{path} is missing or not in the manifest of {folder}: the checkpoint is incomplete")
    for name, path, digest in zip(names, paths, _sha256s(paths)):
        if digest != expected[name]:
            raise ValueError(f"{path} does not match its sha256 in {folder / META}: corrupted or altered; refusing it "
                             "(delete that checkpoint folder, or resume from an older one)")


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
    fsync_tree(tmp)
    replace_durably(tmp, out)
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
        if remote_uri and rank == 0:
            storage.check_writable(remote_uri)  # a wrong bucket fails now, not at the first save

    def latest_tag(self) -> str | None:
        path = self.root / LATEST
        if not path.is_file():
            return None
        tag = checked_tag(path.read_text(), str(path))
        if not (self.root / tag / META).is_file():
            raise FileNotFoundError(f"{path} names {tag!r} but {self.root / tag} is incomplete")
        return tag

    # -- saving ---------------------------------------------------------------------------
    def save(self, ds_engine, *, step: int, meta: dict[str, Any], ema: ShardedEMA | None = None) -> Path:
        """Collective: every rank writes its part, rank 0 completes the checkpoint."""
        tag = f"step{step:08d}"
        tmp = self.root / f".tmp-{tag}"
        if self.rank == 0:
            self._wait_upload()  # the previous checkpoint may still be uploading
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        try:
            ds_engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
            write_atomic(tmp / f"rng_rank{self.rank}.json", json.dumps(rng_state()).encode())
            if ema is not None:
                ema.save(tmp)
        except (OSError, RuntimeError) as err:  # torch.save's zip writer reports a full disk as RuntimeError
            raise self._save_error(err, tag) from err
        dist.barrier()
        if self.rank == 0:
            try:
                self._complete(tmp, tag, {**redact(meta), "step": step, "tag": tag, "world_size": self.world_size})
            except (OSError, RuntimeError) as err:
                raise self._save_error(err, tag) from err
        dist.barrier()
        return self.root / tag

    def _save_error(self, err: Exception, tag: str) -> OSError:
        """The failed save's temp folder removed, and an error saying what is still there."""
        shutil.rmtree(self.root / f".tmp-{tag}", ignore_errors=True)
        previous = (self.root / LATEST).read_text().strip() if (self.root / LATEST).is_file() else "no checkpoint yet"
        free = shutil.disk_usage(self.root).free / 2**20
        return OSError(getattr(err, "errno", None) or errno.EIO,
                       f"could not write checkpoint {tag} in {self.root} ({err}); a full disk or quota ({free:.0f} MiB free now)? "
                       f"free space or lower train.keep_last, then resume: `latest` still names {previous}, intact")

    def _complete(self, tmp: Path, tag: str, meta: dict[str, Any]) -> None:
        """Rank 0, all ranks' files written: manifest, fsync, rename, then `latest`."""
        write_atomic(tmp / META, json.dumps({**meta, "files": manifest(tmp)}, indent=1).encode())
        fsync_tree(tmp)
        old = self.root / f".old-{tag}"  # a re-save of the same step (a resume that trained no step)
        if (self.root / tag).exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.root / tag, old)
        replace_durably(tmp, self.root / tag)
        write_atomic(self.root / LATEST, tag.encode())
        shutil.rmtree(old, ignore_errors=True)
        self._prune()
        if self.remote_uri:
            self._start_upload(tag)

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.root.glob("step*") if p.is_dir())
        for old in tags[: -self.keep_last]:
            shutil.rmtree(self.root / old, ignore_errors=True)

    def _start_upload(self, tag: str) -> None:
        def work() -> None:
            try:
                upload_checkpoint(self.root / tag, self.remote_uri, keep_last=self.keep_last)
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
        tag = storage.read_text(storage.join_url(self.remote_uri, LATEST))
        if tag is None:
            return
        tag = checked_tag(tag, storage.join_url(self.remote_uri, LATEST))
        download_checkpoint(storage.join_url(self.remote_uri, tag), self.root / tag)
        write_atomic(self.root / LATEST, tag.encode())
        print(f"downloaded checkpoint {tag} from {self.remote_uri}", flush=True)

    def prepare_resume(self) -> ResumePoint | None:
        """Collective, before the engine is built: find the latest checkpoint (downloading it from
        the remote URI when the local folder has none) and, when it was saved on another number of
        ranks, convert it to DeepSpeed's universal form (once; kept beside it)."""
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in [*self.root.glob(".tmp-step*"), *self.root.glob(".old-step*")]:  # saves cut by a kill
                shutil.rmtree(stale, ignore_errors=True)
            if self.remote_uri and not (self.root / LATEST).is_file():
                self._fetch_remote()
            tag = self.latest_tag()
            if tag is not None:
                self._verify_local(self.root / tag)
        dist.barrier()
        tag = self.latest_tag()
        if tag is None:
            return None
        folder = self.root / tag
        meta = json.loads((folder / META).read_text())
        universal = meta["world_size"] != self.world_size and has_partitioned_optimizer(folder)
        if universal and self.rank == 0 and not (folder / UNIVERSAL).is_dir():
            print(f"converting {tag} (saved on {meta['world_size']} ranks) for {self.world_size} ranks", flush=True)
            to_universal(folder)
        dist.barrier()
        return ResumePoint(tag, meta, universal)

    @staticmethod
    def _verify_local(folder: Path) -> None:
        meta = json.loads((folder / META).read_text())
        if "files" in meta:
            verify_files(folder, meta)
        else:  # the user's own disk: checked when a manifest exists, as from S3 always
            log.warning("%s has no file manifest (saved before vitscale wrote one): its files are not checked", folder)

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


def upload_checkpoint(folder: Path, remote_uri: str, *, keep_last: int) -> None:
    """Mirror the finished checkpoint `folder` to `remote_uri/<tag>`, then `latest`, then drop
    all but the last `keep_last` there. A failed try is repeated (UPLOAD_TRIES); each sends only
    the files, and the parts of a cut multipart upload, that the store lacks."""
    tag = folder.name
    for attempt in range(UPLOAD_TRIES):
        try:
            storage.upload_dir(folder, storage.join_url(remote_uri, tag),
                               skip=lambda rel: rel.split("/")[0] in (UNIVERSAL, f".tmp-{UNIVERSAL}"))
            storage.write_text(storage.join_url(remote_uri, LATEST), tag)
            break
        except (FileNotFoundError, PermissionError):
            raise  # a deleted bucket, refused credentials: another try would fail the same way
        except Exception as err:
            if attempt == UPLOAD_TRIES - 1:
                raise
            log.warning("uploading %s to %s failed (%s); trying again in %d s", tag, remote_uri, err, 2**attempt)
            time.sleep(2**attempt)
    stored = [t for t in storage.list_folders(remote_uri) if t.startswith("step")]
    for old in stored[: -keep_last]:
        storage.delete_folder(storage.join_url(remote_uri, old))


def download_checkpoint(uri: str, folder: Path, names: list[str] | None = None) -> Path:
    """The checkpoint at `uri` into `folder`: meta.json first, then the files its manifest
    lists (`names`: only those), each checked against it before the folder is put in place."""
    meta_text = storage.read_text(storage.join_url(uri, META))
    if meta_text is None:
        raise FileNotFoundError(f"{storage.join_url(uri, META)} does not exist: {uri} is not a complete checkpoint")
    meta = json.loads(meta_text)
    if "files" not in meta:
        verify_files(folder, meta)  # raises: nothing to check the files against
    wanted = set(meta["files"] if names is None else names)
    for name in wanted:
        safe_join(folder, name)  # refuse `..` and absolute names before anything is written
    tmp = folder.with_name(f".{folder.name}.download{os.getpid()}")
    storage.download_dir(uri, tmp, keep=lambda rel: rel in wanted or rel == META)
    verify_files(tmp, meta, None if names is None else sorted(wanted))
    shutil.rmtree(folder, ignore_errors=True)
    replace_durably(tmp, folder)
    return folder
