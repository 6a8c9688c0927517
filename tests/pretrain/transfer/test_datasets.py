"""Every data set read from its official distribution: unpacked, as a .tar.gz, and with clear errors."""
from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import scipy.io

from pretrain.datasets import DatasetFormatError, dataset_spec, dev_split, load_dataset

from .conftest import class_colour, official_pickle

NAMES = ["cifar10", "cifar100", "pets", "flowers102", "imagefolder"]


def archives_only(name: str, info: dict, dst):
    """A folder holding only what the official download gives before unpacking."""
    folder = info["folder"]
    files = {"cifar10": [info.get("archive")], "cifar100": [info.get("archive")],
             "pets": [folder / "images.tar.gz", folder / "annotations.tar.gz"],
             "flowers102": [folder / "102flowers.tgz", folder / "imagelabels.mat", folder / "setid.mat"],
             "imagefolder": [info.get("archive")]}[name]
    dst.mkdir()
    for f in files:
        shutil.copy(f, dst / f.name)
    return dst


def layouts(name: str, info: dict, tmp_path) -> dict[str, object]:
    out = {"unpacked": info["folder"], "folders above": info["folder"].parent, "archives in a folder": archives_only(name, info, tmp_path / "dl")}
    if "archive" in info:
        out["the archive itself"] = info["archive"]
    return out


def assert_images_match_labels(data, atol=8.0):
    for i in range(len(data)):
        img, label = data[i]
        mean = np.asarray(img, dtype=float).reshape(-1, 3).mean(0)
        np.testing.assert_allclose(mean, class_colour(label), atol=atol, err_msg=f"image {i} (label {label})")


@pytest.mark.parametrize("name", NAMES)
def test_reads_every_layout_of_the_official_files(name, official, tmp_path):
    info = official[name]
    for layout, root in layouts(name, info, tmp_path).items():
        train, test = load_dataset(name, str(root), "train"), load_dataset(name, str(root), "test")
        assert (len(train), len(test)) == (info["train"], info["test"]), layout
        assert train.class_names == info["classes"] and test.class_names == info["classes"], layout
        assert sorted(set(train.labels.tolist())) == list(range(len(info["classes"]))), layout
        assert_images_match_labels(train)
        assert_images_match_labels(test)


def test_flowers_trains_on_train_plus_val_and_tests_on_tstid(official):
    info = official["flowers102"]
    train = load_dataset("flowers102", str(info["folder"]), "train")
    want = np.sort(np.concatenate([info["setid"]["trnid"], info["setid"]["valid"]]))
    assert [p.name for p in train.images] == [f"image_{i:05d}.jpg" for i in want]
    np.testing.assert_array_equal(train.labels, info["labels"][want - 1] - 1)


@pytest.mark.parametrize("name, fraction", [("cifar10", 0.02), ("cifar100", 0.02), ("pets", 0.1), ("flowers102", 0.1)])
def test_dev_split_holds_out_the_vit_papers_fraction_of_train(name, fraction, official):
    root = str(official[name]["folder"])
    assert dataset_spec(name).dev_fraction == fraction
    train = load_dataset(name, root, "train")
    dev_train, dev_val = (train.subset(idx) for idx in dev_split(train, dataset_spec(name).dev_fraction))
    assert len(dev_val) == max(1, round(fraction * len(train))) and len(dev_train) + len(dev_val) == len(train)
    seen = {(tuple(np.asarray(d.load(i)).ravel()[:64]), int(d.labels[i])) for d in (dev_train, dev_val) for i in range(len(d))}
    assert len(seen) == len(train)  # disjoint, and together all of train
    assert len(train.subset(dev_split(train, 0.5)[1])) == round(0.5 * len(train))


def test_missing_paths_say_what_was_expected(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"does not exist; expected cifar-10-batches-py/ with data_batch_1"):
        load_dataset("cifar10", str(tmp_path / "nowhere"), "train")
    with pytest.raises(DatasetFormatError, match=r"pets: no annotations/trainval.txt under .*expected images/\*.jpg"):
        load_dataset("pets", str(tmp_path), "train")
    with pytest.raises(DatasetFormatError, match="flowers102 needs data.root"):
        load_dataset("flowers102", None, "test")
    with pytest.raises(KeyError, match="unknown data set 'cifar1000'; known: cifar10, cifar100, digits"):
        load_dataset("cifar1000", None, "train")
    with pytest.raises(ValueError, match="choose one of train, test$"):
        load_dataset("digits", None, "validation")


def _copy(info, tmp_path):
    return shutil.copytree(info["folder"], tmp_path / "copy", ignore=shutil.ignore_patterns("*.tar.gz", "*.tgz"))


def test_cifar_wrong_formats(official, tmp_path):
    folder = _copy(official["cifar10"], tmp_path)
    (folder / "data_batch_3").write_text("not a pickle")
    with pytest.raises(DatasetFormatError, match=r"cifar10: cannot read the CIFAR python pickles in .*copy: UnpicklingError"):
        load_dataset("cifar10", str(folder), "train")
    (folder / "data_batch_3").write_bytes(official_pickle({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DatasetFormatError, match=r"cannot read the CIFAR python pickles in .*KeyError\('labels'\)"):
        load_dataset("cifar10", str(folder), "train")
    (folder / "data_batch_3").write_bytes(official_pickle({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetFormatError, match=r"cannot read the CIFAR python pickles in .*has size 3072 .* has size 1024"):
        load_dataset("cifar10", str(folder), "train")
    (folder / "data_batch_3").write_bytes(official_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(DatasetFormatError, match=r"or labels outside \[0, 10\)"):
        load_dataset("cifar10", str(folder), "train")
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetFormatError, match="test_batch does not exist"):
        load_dataset("cifar10", str(folder), "test")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_cifar_pickles_cannot_run_code(official, tmp_path):
    folder = _copy(official["cifar10"], tmp_path)
    marker = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload(str(marker)), b"labels": []}, protocol=2))
    with pytest.raises(DatasetFormatError, match="refusing to load posix.mkdir from a CIFAR file"):
        load_dataset("cifar10", str(folder), "train")
    assert not marker.exists()


def test_pets_wrong_formats(official, tmp_path):
    folder = _copy(official["pets"], tmp_path)
    trainval = folder / "annotations" / "trainval.txt"
    good = trainval.read_text()
    trainval.write_text(good + "Bengal_9 x 1\n")
    with pytest.raises(DatasetFormatError, match=r"line 16 of .*trainval.txt is 'Bengal_9 x 1'; expected '<image> <class id 1..37>"):
        load_dataset("pets", str(folder), "train")
    trainval.write_text(good)
    (folder / "images" / "Bengal_2.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=r"1 images listed in .*trainval.txt are missing, e.g. .*Bengal_2.jpg"):
        load_dataset("pets", str(folder), "train")


def test_flowers_wrong_formats(official, tmp_path):
    folder = _copy(official["flowers102"], tmp_path)
    setid = scipy.io.loadmat(folder / "setid.mat")
    scipy.io.savemat(folder / "setid.mat", {"trnid": setid["trnid"], "valid": setid["valid"]})
    with pytest.raises(DatasetFormatError, match=r"setid.mat has no 'tstid' array \(has \['trnid', 'valid'\]\)"):
        load_dataset("flowers102", str(folder), "test")
    (folder / "imagelabels.mat").write_text("labels")
    with pytest.raises(DatasetFormatError, match="imagelabels.mat is not a MATLAB .mat file"):
        load_dataset("flowers102", str(folder), "train")


def test_broken_archive_and_foreign_classes(official, tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetFormatError, match="cifar-10-python.tar.gz is not a readable tar archive"):
        load_dataset("cifar10", str(tmp_path), "train")
    folder = shutil.copytree(official["imagefolder"]["folder"], tmp_path / "photos")
    shutil.copytree(folder / "test" / "cat", folder / "test" / "cow")
    with pytest.raises(DatasetFormatError, match=r"test has classes \['cow'\] that train/ lacks"):
        load_dataset("imagefolder", str(folder), "test")
