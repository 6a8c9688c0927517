"""Oxford-IIIT Pets and Oxford Flowers-102 in their official distributions.

Pets (images.tar.gz + annotations.tar.gz): `images/<name>.jpg` and
`annotations/{trainval,test}.txt` with lines `<name> <class id 1..37> <species> <breed id>`;
the class name is the image name without its trailing `_<number>`.

Flowers-102 (102flowers.tgz + imagelabels.mat + setid.mat): `jpg/image_00001.jpg` ...,
`imagelabels.mat` "labels" (1..102 per image) and `setid.mat` "trnid"/"valid"/"tstid"
(1-based image numbers). As in the ViT paper, train is trnid + valid (2,040 images), test is
tstid (6,149).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pretrain.datasets.archives import DatasetFormatError, locate
from pretrain.datasets.registry import LabeledImages, register_dataset

PETS_EXPECTS = ("images/*.jpg and annotations/{trainval,test}.txt (the official images.tar.gz and "
                "annotations.tar.gz, unpacked or not)")
FLOWERS_EXPECTS = "jpg/image_NNNNN.jpg (102flowers.tgz, unpacked or not), imagelabels.mat and setid.mat"


def _missing_files(paths: list[Path], dataset: str, listed_in: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetFormatError(f"{dataset}: {len(missing)} images listed in {listed_in} are missing, "
                                 f"e.g. {missing[0]}")


def read_pets_list(path: Path) -> list[tuple[str, int]]:
    """(image name, 0-based class) per line of trainval.txt / test.txt."""
    if not path.is_file():
        raise DatasetFormatError(f"pets: {path} is missing; expected {PETS_EXPECTS}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]) or int(parts[1]) < 1:
            raise DatasetFormatError(f"pets: line {n} of {path} is {line!r}; expected '<image> <class id 1..37> <species> <breed id>'")
        rows.append((parts[0], int(parts[1]) - 1))
    if not rows:
        raise DatasetFormatError(f"pets: {path} lists no images")
    return rows


@register_dataset("pets", dev_fraction=0.1)
def pets(root: str | None, split: str) -> LabeledImages:
    """Oxford-IIIT Pets: 37 breeds, 3,680 trainval / 3,669 test images."""
    annotations = locate("pets", root, "annotations/trainval.txt", ("annotations.tar.gz",), PETS_EXPECTS) / "annotations"
    images = locate("pets", root, "images", ("images.tar.gz",), PETS_EXPECTS) / "images"
    lists = {s: read_pets_list(annotations / f"{s}.txt") for s in ("trainval", "test")}
    names: dict[int, str] = {}
    for name, label in lists["trainval"] + lists["test"]:
        names.setdefault(label, name.rsplit("_", 1)[0])
    if sorted(names) != list(range(len(names))):
        raise DatasetFormatError(f"pets: class ids in {annotations} are not 1..{len(names)}")
    rows = lists["trainval" if split == "train" else "test"]
    paths = [images / f"{name}.jpg" for name, _ in rows]
    _missing_files(paths, "pets", annotations / f"{'trainval' if split == 'train' else 'test'}.txt")
    return LabeledImages(paths, np.array([label for _, label in rows], dtype=np.int64), [names[i] for i in range(len(names))])


def _mat_field(path: Path, key: str) -> np.ndarray:
    return _mat_fields(path, key)[0]


def _mat_fields(path: Path, *keys: str) -> list[np.ndarray]:
    """Arrays `keys` of one .mat file (read once), each flattened to int64."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        raise DatasetFormatError(f"flowers102: {path} is missing; expected {FLOWERS_EXPECTS}")
    try:
        mat = loadmat(path)
    except (MatReadError, ValueError, TypeError, OSError) as err:
        raise DatasetFormatError(f"flowers102: {path} is not a MATLAB .mat file ({err})") from None
    for key in keys:
        if key not in mat:
            raise DatasetFormatError(f"flowers102: {path} has no {key!r} array (has {sorted(k for k in mat if not k.startswith('__'))})")
    return [np.asarray(mat[key]).reshape(-1).astype(np.int64) for key in keys]


@register_dataset("flowers102", dev_fraction=0.1)
def flowers102(root: str | None, split: str) -> LabeledImages:
    """Oxford Flowers-102: 102 classes, 2,040 train (train + val) / 6,149 test images."""
    base = locate("flowers102", root, "imagelabels.mat", (), FLOWERS_EXPECTS)
    jpg = locate("flowers102", root, "jpg", ("102flowers.tgz",), FLOWERS_EXPECTS) / "jpg"
    labels = _mat_field(base / "imagelabels.mat", "labels")
    setid = locate("flowers102", root, "setid.mat", (), FLOWERS_EXPECTS) / "setid.mat"
    ids = np.concatenate(_mat_fields(setid, "trnid", "valid")) if split == "train" else _mat_field(setid, "tstid")
    if ids.min() < 1 or ids.max() > len(labels) or labels.min() < 1:
        raise DatasetFormatError(f"flowers102: {setid} names images outside 1..{len(labels)} (the labels in imagelabels.mat)")
    ids = np.sort(ids)
    paths = [jpg / f"image_{i:05d}.jpg" for i in ids]
    _missing_files(paths, "flowers102", setid)
    num_classes = int(labels.max())
    return LabeledImages(paths, labels[ids - 1] - 1, [f"flower {c}" for c in range(1, num_classes + 1)])
