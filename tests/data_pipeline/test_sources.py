"""Each source, converted through the writer, reads back with identical bytes and labels."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipeline import sources
from data_pipeline.shards import iter_tar_samples
from data_pipeline.writer import read_info, write_source


def read_back(out) -> list[dict]:
    info = read_info(out)["splits"]["train"]
    samples = []
    for name in info["filenames"]:
        with open(out / name, "rb") as f:
            samples.extend(iter_tar_samples(f, name))
    assert len(samples) == info["num_samples"] == sum(info["shard_lengths"])
    return samples


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_image_folder_keeps_original_bytes_and_sorted_class_indices(tmp_path, photos):
    root = tmp_path / "folder"
    expected = {}
    for c, name in enumerate(["cat", "dog"]):
        (root / name / "sub").mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.jpg").write_bytes(photos[c * 3 + i])
            expected[f"{name}_{i}"] = (photos[c * 3 + i], c)
    png = sources.png_bytes(np.zeros((8, 8, 3), np.uint8))
    (root / "dog" / "sub" / "p.png").write_bytes(png)
    Image.new("RGB", (5, 4), "red").save(root / "cat" / "b.bmp")  # becomes PNG
    (root / "cat" / "broken.jpg").write_bytes(b"not an image")  # skipped and logged
    write_source(sources.ImageFolderSource(root), tmp_path / "out", prefix="train", samples_per_shard=3, shuffle_seed=None)
    back = {s["__key__"]: s for s in read_back(tmp_path / "out")}
    for key, (data, label) in expected.items():
        assert back[key]["jpg"] == data and int(back[key]["cls"]) == label
    assert back["dog_sub_p"]["png"] == png
    assert pixels(back["cat_b"]["png"]).shape == (4, 5, 3)
    assert "cat_broken" not in back and len(back) == 8
    assert read_info(tmp_path / "out")["class_names"] == ["cat", "dog"]


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_synset_tars_follow_the_synset_map(tmp_path, photos):
    root = tmp_path / "i21k"
    root.mkdir()
    write_tar(root / "n00000002.tar", {f"n00000002_{i}.JPEG": photos[i] for i in range(4)})
    write_tar(root / "n00000001.tar", {f"n00000001_{i}.JPEG": photos[10 + i] for i in range(3)} | {"readme.txt": b"x"})
    write_tar(root / "n00000009.tar", {"n00000009_0.JPEG": photos[20]})  # not in the map: skipped
    (tmp_path / "synsets.txt").write_text("n00000002 second\nn00000001 first\n")
    source = sources.SynsetTarsSource(root, tmp_path / "synsets.txt")
    write_source(source, tmp_path / "out", prefix="train", samples_per_shard=2, processes=2, shuffle_seed=None)
    back = {s["__key__"]: s for s in read_back(tmp_path / "out")}
    assert len(back) == 7
    assert back["n00000002_3"]["jpg"] == photos[3] and int(back["n00000002_3"]["cls"]) == 0
    assert back["n00000001_0"]["jpg"] == photos[10] and int(back["n00000001_0"]["cls"]) == 1
    assert read_info(tmp_path / "out")["class_names"] == ["n00000002", "n00000001"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_label_list_writes_multi_label_samples(tmp_path, photos, fmt):
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(photos[i])
    (tmp_path / "classes.txt").write_text("sky\ntree\nroof\n")
    rows = [("img/0.jpg", ["sky", "tree"]), ("img/1.jpg", ["roof"]), ("img/2.jpg", ["2", "0", "1"]), ("img/3.jpg", [])]
    if fmt == "csv":
        text = "path,labels\n" + "".join(f"{p},{' '.join(ls)}\n" for p, ls in rows)
    else:
        text = "".join(json.dumps({"path": p, "labels": ls}) + "\n" for p, ls in rows)
    (tmp_path / f"list.{fmt}").write_text(text)
    source = sources.LabelListSource(tmp_path / f"list.{fmt}", class_names=tmp_path / "classes.txt")
    write_source(source, tmp_path / "out", prefix="train", samples_per_shard=10, shuffle_seed=None)
    back = read_back(tmp_path / "out")
    assert [json.loads(s["labels.json"]) for s in back] == [[0, 1], [2], [2, 0, 1], []]
    assert [s["jpg"] for s in back] == photos[:4]
    assert read_info(tmp_path / "out")["num_classes"] == 3


def test_label_list_names_an_unknown_label(tmp_path, photos):
    (tmp_path / "list.csv").write_text("a.jpg,cow\n")
    with pytest.raises(ValueError, match=r"list.csv:1: label 'cow'.*--class-names"):
        sources.LabelListSource(tmp_path / "list.csv")


def write_cifar10(root, images: np.ndarray, labels: list[int]) -> None:
    """The official python layout: pickles with bytes keys, rows of R, G, B planes."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    per = len(images) // 5
    for b in range(5):
        batch = {b"batch_label": b"training batch", b"labels": labels[b * per : (b + 1) * per], b"data": rows[b * per : (b + 1) * per]}
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": labels[:2], b"data": rows[:2]}, protocol=2))
    names = [f"class{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))


def test_cifar10_pixels_and_labels_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, 10)]
    write_cifar10(tmp_path, images, labels)
    write_source(sources.CifarSource(tmp_path, "train"), tmp_path / "out", prefix="train", samples_per_shard=4, shuffle_seed=None)
    back = read_back(tmp_path / "out")
    assert all(np.array_equal(pixels(s["png"]), img) for s, img in zip(back, images))
    assert [int(s["cls"]) for s in back] == labels
    assert read_info(tmp_path / "out")["class_names"][3] == "class3"
    assert len(sources.CifarSource(tmp_path / "cifar-10-batches-py", "test")) == 2


def test_cifar100_uses_fine_labels_and_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    (folder / "train").write_bytes(pickle.dumps({b"data": images, b"fine_labels": [7, 99], b"coarse_labels": [1, 2]}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}))
    source = sources.CifarSource(tmp_path, "train")
    assert [source.load(i).label for i in range(2)] == [7, 99] and source.class_names[99] == "f99"

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "train").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        sources.CifarSource(tmp_path, "train")


def write_idx(path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_pixels_and_labels_round_trip(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7, dtype=np.uint8))
    write_source(sources.FashionMnistSource(tmp_path, "train"), tmp_path / "out", prefix="train", samples_per_shard=3, shuffle_seed=None)
    back = read_back(tmp_path / "out")
    assert all(np.array_equal(pixels(s["png"]), img) for s, img in zip(back, images))
    assert [int(s["cls"]) for s in back] == list(range(7))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        sources.FashionMnistSource(tmp_path, "test")
