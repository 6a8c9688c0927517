"""Shards we write are read back byte for byte, by webdataset, and by timm's wds reader."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline import sources
from data_pipeline.sample import Sample
from data_pipeline.shards import iter_tar_samples
from data_pipeline.writer import read_info, write_split


def photos(n):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield Sample(f"img_{i:04d}", sources.png_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), "png", i % 3)


def test_round_trip_keeps_bytes_labels_and_index(tmp_path):
    originals = list(photos(25))
    info = write_split(iter(originals), tmp_path, prefix="train", samples_per_shard=10, class_names=["a", "b", "c"])
    assert info["shard_lengths"] == [10, 10, 5] and info["filenames"][0] == "train-000000.tar"
    assert read_info(tmp_path)["splits"]["train"]["num_samples"] == 25 and read_info(tmp_path)["num_classes"] == 3
    back = []
    for name in info["filenames"]:
        with open(tmp_path / name, "rb") as f:
            back.extend(iter_tar_samples(f, name))
    assert [s["__key__"] for s in back] == [s.key for s in originals]
    assert all(b["png"] == o.image and int(b["cls"]) == o.label for b, o in zip(back, originals))
    assert not list(tmp_path.glob(".*tmp*"))  # temp names were renamed


def test_multi_label_samples_store_labels_json(tmp_path):
    write_split([Sample("k_0", b"\x89PNG", "png", (3, 7))], tmp_path, prefix="jft", samples_per_shard=5)
    with tarfile.open(tmp_path / "jft-000000.tar") as tar:
        assert json.loads(tar.extractfile("k_0.labels.json").read()) == [3, 7]


def test_webdataset_reads_our_shards(tmp_path):
    write_split(photos(12), tmp_path, prefix="train", samples_per_shard=5)
    ds = wds.WebDataset(str(tmp_path / "train-{000000..000002}.tar"), shardshuffle=False).decode("pil").to_tuple("png", "cls")
    items = list(ds)
    assert len(items) == 12 and isinstance(items[0][0], Image.Image) and items[4][1] == 4 % 3


def test_timm_wds_reader_reads_our_shards(tmp_path):
    from timm.data import create_dataset

    write_split(photos(12), tmp_path, prefix="train", samples_per_shard=5)
    ds = create_dataset("wds/vitscale", root=str(tmp_path), split="train", is_training=False, batch_size=1)
    items = list(ds)
    assert len(items) == 12 and sorted(t for _, t in items) == sorted(i % 3 for i in range(12))


def test_our_reader_reads_webdataset_tarwriter_shards(tmp_path):
    with wds.TarWriter(str(tmp_path / "theirs.tar")) as sink:
        for s in photos(4):
            sink.write({"__key__": s.key, "png": s.image, "cls": s.label})
    with open(tmp_path / "theirs.tar", "rb") as f:
        got = list(iter_tar_samples(f, "theirs.tar"))
    assert [int(g["cls"]) for g in got] == [0, 1, 2, 0]


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must not contain"):
        write_split([Sample("a.b", b"x", "png", 0)], tmp_path, prefix="t", samples_per_shard=2)
