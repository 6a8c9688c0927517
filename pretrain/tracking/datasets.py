"""The data a run read, as MLflow datasets (`mlflow.data`): the Dataset column of MLflow's UI.

    shard_dataset(pattern)        a shard set: named after its `_info.json` ("name/split"), the
                                  digest of that index (of the URLs and sample counts where other
                                  tools wrote the shards), the URL pattern as its source, sample
                                  and shard counts as its profile
    transfer_dataset(name, ...)   a transfer data set: its registry name, a digest of its files

A transfer digest covers each image file's name and size (not its bytes: reading every JPEG of
ImageNet to name a run is hours) and the pixels and labels of data sets loaded as arrays (CIFAR,
digits), together with the label list, so any change of the files a run trained on changes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath

import numpy as np
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from data_pipeline.storage import expand_urls, open_url
from data_pipeline.stream import open_shard_set

DIGEST_CHARS = 16  # MLflow's UI shows digests whole; its own are 8


class ProfiledDataset(MetaDataset):
    """MLflow's metadata-only dataset plus a profile (MetaDataset has none)."""

    def __init__(self, source, *, name: str, digest: str, profile: dict):
        super().__init__(source, name=name, digest=digest)
        self._profile = profile

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self._profile)}


def _source(url: str):
    """MLflow's own source type for the URL (local, s3, http), `local` for a path pattern."""
    if "://" not in url:
        url = os.path.abspath(url)
    return resolve_dataset_source(url)


def shard_dataset(pattern: str) -> ProfiledDataset:
    """The shard set `pattern` names (braces expanded as the loader expands them)."""
    shards = open_shard_set(pattern)
    folder = posixpath.dirname(expand_urls(pattern)[0])
    try:
        with open_url(posixpath.join(folder, "_info.json")) as f:
            index = f.read()
        info = json.loads(index)
    except FileNotFoundError:  # shards written by other tools: what the stream counted
        index, info = json.dumps([shards.urls, shards.lengths]).encode(), {}
    names = [posixpath.basename(u) for u in shards.urls]
    splits = [s for s, v in info.get("splits", {}).items() if set(names) <= set(v.get("filenames", []))]
    name = "/".join(filter(None, [info.get("name") or posixpath.basename(folder), splits[0] if len(splits) == 1 else None]))
    return ProfiledDataset(_source(pattern), name=name, digest=hashlib.sha256(index).hexdigest()[:DIGEST_CHARS],
                           profile={"num_samples": shards.num_samples, "num_shards": len(shards.urls),
                                    "index_sha256": hashlib.sha256(index).hexdigest()})


def _files_digest(splits: dict) -> str:
    digest = hashlib.sha256()
    for split, data in sorted(splits.items()):
        digest.update(f"{split}:{json.dumps(data.class_names)}".encode())
        digest.update(np.ascontiguousarray(data.labels).tobytes())
        if isinstance(data.images, np.ndarray):
            digest.update(np.ascontiguousarray(data.images).tobytes())
        else:
            for path in data.images:
                digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()[:DIGEST_CHARS]


def transfer_dataset(name: str, root: str | None, splits: dict) -> ProfiledDataset:
    """Transfer data set `name` read from `root` (None: shipped with a package), `splits` {"train": LabeledImages, ...}."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    source = _source(root) if root else CodeDatasetSource({"dataset": name, "loader": "pretrain.datasets"})
    profile = {f"num_{split}": len(data) for split, data in splits.items()}
    profile["num_classes"] = next(iter(splits.values())).num_classes
    return ProfiledDataset(source, name=name, digest=_files_digest(splits), profile=profile)


def log_shard_datasets(tracker, *, train: str, val: str | None) -> None:
    """The training (and validation) shard sets as the run's datasets; nothing where the rank has no run."""
    if tracker.run_id is None:
        return
    tracker.log_dataset(shard_dataset(train), "train")
    if val:
        tracker.log_dataset(shard_dataset(val), "val")


def log_transfer_dataset(tracker, name: str, root: str | None, splits: dict) -> None:
    """A transfer data set as the run's dataset ("train": its splits' digest); nothing where the rank has no run."""
    if tracker.run_id is not None:
        tracker.log_dataset(transfer_dataset(name, root, splits), "train")
