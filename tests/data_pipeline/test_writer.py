"""Shards we write are read back byte for byte, by webdataset, and by timm's wds reader."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline import sources
from data_pipeline.sample import Sample
from data_pipeline.shards import iter_tar_samples
from data_pipeline.writer import item_order, member_header, parse_size, read_info, write_source, write_split


def png_samples(n):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield Sample(f"img_{i:04d}", sources.png_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), "png", i % 3)


def test_round_trip_keeps_bytes_labels_and_index(tmp_path):
    originals = list(png_samples(25))
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
    write_split(png_samples(12), tmp_path, prefix="train", samples_per_shard=5)
    ds = wds.WebDataset(str(tmp_path / "train-{000000..000002}.tar"), shardshuffle=False).decode("pil").to_tuple("png", "cls")
    items = list(ds)
    assert len(items) == 12 and isinstance(items[0][0], Image.Image) and items[4][1] == 4 % 3


def test_timm_wds_reader_reads_our_shards(tmp_path):
    from timm.data import create_dataset

    write_split(png_samples(12), tmp_path, prefix="train", samples_per_shard=5)
    ds = create_dataset("wds/vitscale", root=str(tmp_path), split="train", is_training=False, batch_size=1)
    items = list(ds)
    assert len(items) == 12 and sorted(t for _, t in items) == sorted(i % 3 for i in range(12))


def test_our_reader_reads_webdataset_tarwriter_shards(tmp_path):
    with wds.TarWriter(str(tmp_path / "theirs.tar")) as sink:
        for s in png_samples(4):
            sink.write({"__key__": s.key, "png": s.image, "cls": s.label})
    with open(tmp_path / "theirs.tar", "rb") as f:
        got = list(iter_tar_samples(f, "theirs.tar"))
    assert [int(g["cls"]) for g in got] == [0, 1, 2, 0]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_follows_long_names_pax_headers_and_skips_directories(tmp_path, fmt):
    long_key = "d" * 120 + "/ünïcode_" + "k" * 90
    with tarfile.open(tmp_path / "t.tar", "w", format=fmt) as tar:
        tar.add(tmp_path, arcname="a_dir", recursive=False)  # a directory member
        for name, data in ((f"{long_key}.jpg", b"\xff\xd8img"), (f"{long_key}.cls", b"4"), ("short.png", b"png")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(tmp_path / "t.tar", "rb") as f:
        got = list(iter_tar_samples(f, "t.tar"))
    assert [(g["__key__"], sorted(k for k in g if not k.startswith("__"))) for g in got] == [(long_key, ["cls", "jpg"]), ("short", ["png"])]
    assert got[0]["jpg"] == b"\xff\xd8img"


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must not contain"):
        write_split([Sample("a.b", b"x", "png", 0)], tmp_path, prefix="t", samples_per_shard=2)


# ---------------------------------------------------------------- indexed sources: plan, parallel, resume, S3

def photo_folder(root, photos, n=24):
    for i in range(n):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 3}" / f"{i:03d}.jpg").write_bytes(photos[i])
    return sources.ImageFolderSource(root)


def shard_bytes_of(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_parallel_writing_gives_the_same_shards_as_one_process(tmp_path, photos):
    source = photo_folder(tmp_path / "src", photos)
    one = write_source(source, tmp_path / "one", prefix="train", samples_per_shard=5)
    three = write_source(source, tmp_path / "three", prefix="train", samples_per_shard=5, processes=3)
    assert one == three and one["shard_lengths"] == [5, 5, 5, 5, 4]
    assert shard_bytes_of(tmp_path / "one") == shard_bytes_of(tmp_path / "three")
    assert not list((tmp_path / "three").glob(".*"))  # no temp names left


def test_shard_size_target(tmp_path, photos):
    source = photo_folder(tmp_path / "src", photos)
    target = parse_size("20KB")
    assert target == 20_000 and parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 * 2**20
    info = write_source(source, tmp_path / "out", prefix="train", shard_bytes=target)
    sizes = [(tmp_path / "out" / name).stat().st_size for name in info["filenames"]]
    average = sum(sizes) / len(sizes)
    assert len(sizes) > 3 and 0.6 * target < average < 1.4 * target
    assert sum(info["shard_lengths"]) == 24
    with pytest.raises(ValueError, match="write e.g. 1GB"):
        parse_size("big")


class CrashingFolder(sources.ImageFolderSource):
    """The same listing, but the conversion dies at the 18th item written (in shard 3 of 5-item
    shards), as a killed run would."""

    def load(self, i):
        if i == item_order(len(self), limit=None, shuffle_seed=0)(np.array([17]))[0]:
            raise KeyboardInterrupt
        return super().load(i)


def test_resume_continues_an_interrupted_conversion(tmp_path, photos):
    photo_folder(tmp_path / "src", photos)
    out = tmp_path / "out"
    write_source(sources.ImageFolderSource(tmp_path / "src"), tmp_path / "reference", prefix="train", samples_per_shard=5)
    with pytest.raises(KeyboardInterrupt):
        write_source(CrashingFolder(tmp_path / "src"), out, prefix="train", samples_per_shard=5)
    assert sorted(shard_bytes_of(out)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not (out / "_info.json").exists()
    (out / ".train-000003.tar.tmp999").write_bytes(b"half a shard")  # as left by a killed process
    finished = {n: (out / n).stat().st_mtime_ns for n in shard_bytes_of(out)}
    with pytest.raises(ValueError, match="differ from the interrupted run"):
        write_source(sources.ImageFolderSource(tmp_path / "src"), out, prefix="train", samples_per_shard=4, resume=True)
    info = write_source(sources.ImageFolderSource(tmp_path / "src"), out, prefix="train", samples_per_shard=5, resume=True)
    assert info["shard_lengths"] == [5, 5, 5, 5, 4]
    assert shard_bytes_of(out) == shard_bytes_of(tmp_path / "reference")
    assert all((out / n).stat().st_mtime_ns == t for n, t in finished.items())  # finished shards untouched
    assert not (out / ".train-000003.tar.tmp999").exists() and not (out / "_progress-train.json").exists()


def test_quality_reencodes_only_when_asked(tmp_path, photos):
    source = photo_folder(tmp_path / "src", photos, n=3)
    info = write_source(source, tmp_path / "out", prefix="train", samples_per_shard=5, quality=40)
    with open(tmp_path / "out" / info["filenames"][0], "rb") as f:
        back = list(iter_tar_samples(f, "x"))
    assert all(b["jpg"] != photos[i] and len(b["jpg"]) < len(photos[i]) for i, b in enumerate(back))
    assert Image.open(io.BytesIO(back[0]["jpg"])).size == Image.open(io.BytesIO(photos[0])).size


def test_write_to_s3_resume_then_stream_back(tmp_path, photos, s3_server, monkeypatch):
    from data_pipeline import storage
    from data_pipeline.stream import open_shard_set

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    storage._s3_client_for.cache_clear()
    bucket = s3_server.create_bucket()
    photo_folder(tmp_path / "src", photos)
    out = f"s3://{bucket}/sets/photos"
    with pytest.raises(KeyboardInterrupt):
        write_source(CrashingFolder(tmp_path / "src"), out, prefix="train", samples_per_shard=5)
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="sets/photos/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [f"sets/photos/{n}" for n in ("_progress-train.json", "train-000000.tar", "train-000001.tar", "train-000002.tar")]
    source = sources.ImageFolderSource(tmp_path / "src")
    info = write_source(source, out, prefix="train", samples_per_shard=5, processes=2, resume=True)
    assert info["shard_lengths"] == [5, 5, 5, 5, 4] and read_info(out)["splits"]["train"] == info
    shards = open_shard_set(f"{out}/train-{{000000..000004}}.tar")
    assert shards.lengths == [5, 5, 5, 5, 4]
    with storage.open_url(shards.urls[3]) as f:
        back = list(iter_tar_samples(f, shards.urls[3]))
    order = item_order(len(source), limit=None, shuffle_seed=0)
    assert [b["jpg"] for b in back] == [source.load(i).image for i in order(np.arange(15, 20))]
    storage._s3_client_for.cache_clear()


def test_member_headers_are_the_ones_tarfile_writes():
    for name, size in (("a.jpg", 1000), ("k" * 96 + ".cls", 1), ("ünï_x.png", 0), ("b.labels.json", 10**9)):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, 0
        assert member_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="ustar limit"):
        member_header("k" * 101 + ".jpg", 1)


def test_item_order_is_a_seeded_bijection_and_limit_a_random_subset():
    for n in (1, 2, 7, 1000, 4097):
        assert sorted(item_order(n, limit=None, shuffle_seed=3)(np.arange(n))) == list(range(n))
    a, b = (item_order(1000, limit=None, shuffle_seed=s)(np.arange(1000)) for s in (0, 1))
    assert not np.array_equal(a, b) and np.array_equal(a, item_order(1000, limit=None, shuffle_seed=0)(np.arange(1000)))
    assert abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.1  # no trace of the source's order
    subset = item_order(1000, limit=100, shuffle_seed=None)(np.arange(100))
    assert list(subset) == sorted(set(subset.tolist())) and subset.max() > 900  # source order, drawn from all of it
    assert np.array_equal(item_order(1000, limit=None, shuffle_seed=None)(np.arange(5)), np.arange(5))
