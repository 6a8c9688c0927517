"""Tiny data sets written in exactly the official distributions' formats, and a tiny exported model.

Each image is a solid colour of its class (`class_colour`) plus mild noise, so a test can check
that every image arrived with its own label.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from pretrain.checkpoint.export import save_exported
from pretrain.models import build_model


def class_colour(label: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + label)
    return rng.integers(30, 226, 3).astype(np.uint8)


def class_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    noise = rng.integers(-8, 9, (size, size, 3))
    return np.clip(class_colour(label).astype(int) + noise, 0, 255).astype(np.uint8)


def official_pickle(obj: dict) -> bytes:
    """Protocol 2 as the CIFAR files, whose numpy arrays refer to numpy.core.multiarray (numpy 1 names)."""
    return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def tar_gz(archive: Path, source: Path, members: list[str]) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for name in members:
            tar.add(source / name, arcname=name)
    return archive


def _cifar_batch(labels: list[int], rng, label_key: bytes, extra: dict) -> dict:
    pixels = np.stack([class_image(c, rng) for c in labels])  # (N, 32, 32, 3)
    return {b"batch_label": b"fixture", label_key: labels, **extra,
            b"data": pixels.transpose(0, 3, 1, 2).reshape(len(labels), -1).copy(),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}


def write_cifar10(root: Path) -> dict:
    """cifar-10-batches-py/ (5 train batches of one image per class, a test batch) and its .tar.gz."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(official_pickle({b"num_cases_per_batch": 10, b"label_names": names, b"num_vis": 3072}))
    for i in range(1, 6):
        labels = rng.permutation(10).tolist()
        (folder / f"data_batch_{i}").write_bytes(official_pickle(_cifar_batch(labels, rng, b"labels", {})))
    (folder / "test_batch").write_bytes(official_pickle(_cifar_batch(list(range(10)) * 2, rng, b"labels", {})))
    (folder / "readme.html").write_text("<html>CIFAR-10</html>")
    archive = tar_gz(root / "cifar-10-python.tar.gz", root, ["cifar-10-batches-py"])
    return {"folder": folder, "archive": archive, "train": 50, "test": 20, "classes": [n.decode() for n in names]}


def write_cifar100(root: Path) -> dict:
    """cifar-100-python/{train,test,meta} with 4 fine classes and its .tar.gz."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [b"apple", b"aquarium_fish", b"baby", b"bear"]
    (folder / "meta").write_bytes(official_pickle({b"fine_label_names": fine, b"coarse_label_names": [b"fruit", b"fish", b"people", b"mammals"]}))
    for split, per_class in (("train", 5), ("test", 2)):
        labels = rng.permutation(np.repeat(np.arange(4), per_class)).tolist()
        batch = _cifar_batch(labels, rng, b"fine_labels", {b"coarse_labels": labels})
        (folder / split).write_bytes(official_pickle(batch))
    archive = tar_gz(root / "cifar-100-python.tar.gz", root, ["cifar-100-python"])
    return {"folder": folder, "archive": archive, "train": 20, "test": 8, "classes": [n.decode() for n in fine]}


def _jpeg(path: Path, label: int, rng) -> None:
    Image.fromarray(class_image(label, rng, size=int(rng.integers(40, 64)))).save(path, quality=95)


PETS_BREEDS = [("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1)]  # (breed, species 1 cat / 2 dog)


def write_pets(root: Path) -> dict:
    """images/*.jpg and annotations/{trainval,test,list}.txt, plus images.tar.gz and annotations.tar.gz."""
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    lines = {"trainval": [], "test": []}
    for cls, (breed, species) in enumerate(PETS_BREEDS):
        for n in range(1, 8):
            name = f"{breed}_{n}"
            _jpeg(root / "images" / f"{name}.jpg", cls, rng)
            lines["trainval" if n <= 5 else "test"].append(f"{name} {cls + 1} {species} {cls + 1}")
    for split, rows in lines.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    (root / "annotations" / "list.txt").write_text(header + "\n".join(lines["trainval"] + lines["test"]) + "\n")
    tar_gz(root / "images.tar.gz", root, ["images"])
    tar_gz(root / "annotations.tar.gz", root, ["annotations"])
    return {"folder": root, "train": 15, "test": 6, "classes": [b for b, _ in PETS_BREEDS]}


def write_flowers(root: Path) -> dict:
    """jpg/image_NNNNN.jpg, imagelabels.mat and setid.mat (trnid/valid/tstid), plus 102flowers.tgz."""
    rng = np.random.default_rng(3)
    (root / "jpg").mkdir(parents=True)
    labels = np.repeat(np.arange(1, 4), 6)  # 3 classes x 6 images, 1-based as the official file
    order = rng.permutation(len(labels))
    labels = labels[order]
    for i, label in enumerate(labels, 1):
        _jpeg(root / "jpg" / f"image_{i:05d}.jpg", int(label) - 1, rng)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": labels[None].astype(np.uint8)})
    ids = {c: np.flatnonzero(labels == c) + 1 for c in (1, 2, 3)}
    setid = {"trnid": np.concatenate([v[:2] for v in ids.values()]), "valid": np.concatenate([v[2:4] for v in ids.values()]),
             "tstid": np.concatenate([v[4:] for v in ids.values()])}
    scipy.io.savemat(root / "setid.mat", {k: v[None].astype(np.uint16) for k, v in setid.items()})
    tar_gz(root / "102flowers.tgz", root, ["jpg"])
    return {"folder": root, "train": 12, "test": 6, "classes": ["flower 1", "flower 2", "flower 3"], "setid": setid, "labels": labels}


def write_imagefolder(base: Path) -> dict:
    """photos/{train,test}/<class>/*.png and photos.tar.gz."""
    rng = np.random.default_rng(4)
    root = base / "photos"
    classes = ["cat", "dog"]
    for split, n in (("train", 4), ("test", 2)):
        for cls, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(class_image(cls, rng)).save(root / split / name / f"{i}.png")
    archive = tar_gz(base / "photos.tar.gz", base, ["photos"])
    return {"folder": root, "archive": archive, "train": 8, "test": 4, "classes": classes}


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "pets": write_pets, "flowers102": write_flowers,
           "imagefolder": write_imagefolder}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: a second intra-op thread only spins (10x the CPU time on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _archive_cache(tmp_path_factory, monkeypatch):
    """Archives unpack into a per-session temp cache, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(scope="session")
def official(tmp_path_factory) -> dict[str, dict]:
    """Every data set's fixture, written once per session."""
    return {name: write(tmp_path_factory.mktemp(name)) for name, write in WRITERS.items()}


def export_tiny_model(path: Path, *, num_classes: int = 10, seed: int = 0, run_id: str | None = "pretrain-run",
                      step: int = 7, **model_kwargs) -> Path:
    """A random `vit_demo` (28 px, patch 4) exported as `python -m pretrain export` writes it."""
    torch.manual_seed(seed)
    model = build_model("vit_demo", num_classes=num_classes, **model_kwargs)
    meta = {"model": "vit_demo", "model_kwargs": model_kwargs, "num_classes": num_classes, "image_size": 28,
            "mean": [0.5] * 3, "std": [0.5] * 3, "run_id": run_id, "step": step}
    return save_exported(model.state_dict(), path, meta)


@pytest.fixture
def tiny_export(tmp_path) -> Path:
    return export_tiny_model(tmp_path / "export" / "model.safetensors")

