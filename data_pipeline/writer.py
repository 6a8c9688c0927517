"""Write samples into WebDataset tar shards plus the `_info.json` index timm's reader_wds reads."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from data_pipeline.sample import Sample
from data_pipeline.storage import write_atomic

INFO_NAME = "_info.json"


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o444
    info.mtime = 0  # same bytes for the same samples: shards are reproducible
    tar.addfile(info, io.BytesIO(payload))


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in webdataset's `key.field` naming."""
    if "." in sample.key or "/" in sample.key:
        raise ValueError(f"sample key {sample.key!r} must not contain '.' or '/' (webdataset splits on them)")
    members = [(f"{sample.key}.{sample.ext}", sample.image)]
    if isinstance(sample.label, int):
        members.append((f"{sample.key}.cls", str(sample.label).encode()))
    elif sample.label is not None:
        members.append((f"{sample.key}.labels.json", json.dumps(list(sample.label)).encode()))
    return members


class _ShardSink:
    """One shard at a time, written under a temp name and renamed when complete."""

    def __init__(self, out_dir: Path, prefix: str):
        self.out_dir, self.prefix = out_dir, prefix
        self.filenames: list[str] = []
        self.lengths: list[int] = []
        self._tar: tarfile.TarFile | None = None

    def open_next(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.filenames):06d}.tar"
        self._final = self.out_dir / name
        self._tmp = self.out_dir / f".{name}.tmp{os.getpid()}"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.filenames.append(name)
        self.lengths.append(0)
        self.bytes = 0

    def add(self, sample: Sample) -> None:
        for name, payload in sample_members(sample):
            _add_member(self._tar, name, payload)
            self.bytes += 512 + (len(payload) + 511) // 512 * 512
        self.lengths[-1] += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self._final)
            self._tar = None


def write_split(
    samples: Iterable[Sample],
    out_dir: str | Path,
    *,
    prefix: str,
    split: str = "train",
    samples_per_shard: int | None = None,
    shard_bytes: int | None = None,
    class_names: list[str] | None = None,
    total: int | None = None,
) -> dict:
    """Write `samples` as `prefix-000000.tar`... in `out_dir`; record the split in `_info.json`."""
    if not samples_per_shard and not shard_bytes:
        raise ValueError("give samples_per_shard or shard_bytes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sink = _ShardSink(out_dir, prefix)
    for sample in tqdm(samples, total=total, desc=f"write {prefix}", unit="img", mininterval=2):
        full = sink._tar is None or (
            (samples_per_shard and sink.lengths[-1] >= samples_per_shard) or (shard_bytes and sink.bytes >= shard_bytes)
        )
        if full:
            sink.open_next()
        sink.add(sample)
    sink.close()
    split_info = {
        "name": split,
        "num_samples": sum(sink.lengths),
        "filenames": sink.filenames,
        "shard_lengths": sink.lengths,
    }
    update_info(out_dir, split_info, class_names)
    return split_info


def update_info(out_dir: Path, split_info: dict, class_names: list[str] | None) -> None:
    info_path = out_dir / INFO_NAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {"name": out_dir.name, "splits": {}}
    info["splits"][split_info["name"]] = split_info
    if class_names is not None:
        info["class_names"] = class_names
        info["num_classes"] = len(class_names)
    write_atomic(info_path, json.dumps(info, indent=1).encode())


def read_info(out_dir: str | Path) -> dict:
    path = Path(out_dir) / INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: write shards with `python -m data_pipeline write`")
    return json.loads(path.read_text())
