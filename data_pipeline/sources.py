"""Readers of the image collections users convert into shards.

A source is an indexed listing: `len(source)` items, `source.load(i) -> Sample` (or None
for an unreadable file, logged), and `source.sizes()` (bytes per item) so the writer can
plan shard boundaries before reading any image. Listing orders are deterministic (sorted),
so the same input always gives the same shards. JPEG, PNG and WebP bytes are kept as
they are; other formats become PNG; `--quality` re-encoding happens in the writer.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import re
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from data_pipeline.sample import Sample

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def image_format(data: bytes) -> str | None:
    """The shard field for encoded bytes we keep as they are, by their magic number."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def encoded_image(data: bytes, where: str) -> tuple[bytes, str] | None:
    """(bytes, field): kept as is when JPEG/PNG/WebP, else converted to PNG; None if unreadable."""
    fmt = image_format(data)
    if fmt is not None:
        return data, fmt
    try:
        with Image.open(io.BytesIO(data)) as img:
            return png_bytes(np.asarray(img.convert("RGB"))), "png"
    except Exception as err:  # PIL raises many types for broken bytes
        log.warning("skipping %s: not a readable image (%s)", where, err)
        return None


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def key_of(relpath: str) -> str:
    """A webdataset key from a relative path: no '.' or '/' (webdataset splits on them)."""
    return _UNSAFE.sub("_", relpath.rsplit(".", 1)[0] if "." in Path(relpath).name else relpath).strip("_") or "_"


class Source:
    """Base of the indexed listings; subclasses fill `keys`-like state and `load`."""

    kind = ""
    class_names: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def sizes(self) -> np.ndarray:
        """Bytes each item adds to a shard (exact when bytes are copied, else an estimate)."""
        raise NotImplementedError

    def load(self, i: int) -> Sample | None:
        raise NotImplementedError

    def describe(self) -> dict:
        """What identifies this listing, for `--resume` to check it did not change."""
        return {"kind": self.kind, "items": len(self), "sizes": hashlib.sha1(self.sizes().tobytes()).hexdigest()}


def _in_tar(image_bytes: np.ndarray) -> np.ndarray:
    """Tar bytes of samples: image padded to 512, a header for it and for the label, a label block."""
    return (image_bytes + 511) // 512 * 512 + 3 * 512


# ---------------------------------------------------------------- files on disk

class _FileListSource(Source):
    """Items are image files; subclasses give paths (relative to `root`) and labels."""

    def __init__(self, root: Path, relpaths: list[str], labels: list, class_names: list[str] | None):
        self.root, self.relpaths, self.labels, self.class_names = root, relpaths, labels, class_names
        self._sizes: np.ndarray | None = None
        self.keys = []
        for rel in relpaths:  # adjacent equal keys would merge into one sample in a tar
            key = key_of(rel)
            self.keys.append(key if not self.keys or self.keys[-1] != key else key_of(rel.replace(".", "_")))

    def __len__(self) -> int:
        return len(self.relpaths)

    def sizes(self) -> np.ndarray:
        if self._sizes is None:
            self._sizes = _in_tar(np.array([os.stat(self.root / r).st_size for r in self.relpaths], dtype=np.int64))
        return self._sizes

    def load(self, i: int) -> Sample | None:
        path = self.root / self.relpaths[i]
        try:
            data = path.read_bytes()
        except OSError as err:
            log.warning("skipping %s: %s", path, err)
            return None
        encoded = encoded_image(data, str(path))
        if encoded is None:
            return None
        return Sample(self.keys[i], encoded[0], encoded[1], self.labels[i])


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class ImageFolderSource(_FileListSource):
    """`root/<class>/**/<image>`: classes are the sorted sub-folder names (torchvision's rule)."""

    kind = "imagefolder"

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not classes:
            raise ValueError(f"{root} has no class sub-folders; expected ROOT/<class>/<image files>")
        relpaths, labels = [], []
        for index, name in enumerate(classes):
            for path in _images_under(root / name):
                relpaths.append(str(path.relative_to(root)))
                labels.append(index)
        if not relpaths:
            raise ValueError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        super().__init__(root, relpaths, labels, classes)


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (index = line number), or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-names file {path} does not exist")
    text = path.read_text()
    if text.lstrip().startswith("["):
        return [str(n) for n in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


class LabelListSource(_FileListSource):
    """A JFT-style list of `path, labels`: CSV (`path,labels` with labels separated by spaces
    or `;`) or JSONL (`{"path": ..., "labels": [...]}`). Labels are class indices, or names
    looked up in the class-names file. Every image keeps a multi-label tuple."""

    kind = "label-list"

    def __init__(self, list_path: str | Path, class_names: str | Path | None = None, image_root: str | Path | None = None):
        list_path = Path(list_path)
        if not list_path.is_file():
            raise FileNotFoundError(f"label list {list_path} does not exist")
        names = read_class_names(class_names) if class_names else None
        index = {n: i for i, n in enumerate(names)} if names else {}
        relpaths, labels = [], []
        for line_no, (path, raw) in enumerate(self._rows(list_path), start=1):
            try:
                labels.append(tuple(int(x) if x.lstrip("-").isdigit() else index[x] for x in raw))
            except KeyError as err:
                hint = "it is not in the class-names file" if names else "give --class-names to map names to indices"
                raise ValueError(f"{list_path}:{line_no}: label {err.args[0]!r} is not an index; {hint}") from None
            relpaths.append(path)
        root = Path(image_root) if image_root else list_path.parent
        super().__init__(root, relpaths, labels, names)

    @staticmethod
    def _rows(list_path: Path) -> Iterator[tuple[str, list[str]]]:
        if list_path.suffix == ".jsonl":
            with open(list_path) as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        labels = record.get("labels", record.get("label", []))
                        yield record["path"], [str(x) for x in (labels if isinstance(labels, list) else [labels])]
                    except (json.JSONDecodeError, KeyError, AttributeError) as err:
                        raise ValueError(f"{list_path}:{line_no}: expected {{\"path\": ..., \"labels\": [...]}} ({err})") from None
            return
        with open(list_path, newline="") as f:
            for line_no, row in enumerate(csv.reader(f), start=1):
                if not row or (line_no == 1 and [c.strip().lower() for c in row[:2]] == ["path", "labels"]):
                    continue
                labels = " ".join(row[1:]).replace(";", " ").replace("|", " ").split()
                yield row[0].strip(), labels


# ---------------------------------------------------------------- per-synset tars

def read_synset_map(path: str | Path) -> list[str]:
    """Synsets in label order: one per line (`n01440764` or `n01440764 name...`), or JSON
    (a list, or {synset: index})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synset map {path} does not exist")
    text = path.read_text()
    if text.lstrip().startswith("{"):
        mapping = json.loads(text)
        return [s for s, _ in sorted(mapping.items(), key=lambda kv: int(kv[1]))]
    if text.lstrip().startswith("["):
        return [str(s) for s in json.loads(text)]
    return [line.split()[0] for line in text.splitlines() if line.strip()]


class SynsetTarsSource(Source):
    """ImageNet-21k's layout: `root/n01234567.tar`, each a tar of that synset's JPEGs.

    Items are tar members, read by offset (no extraction); a synset map gives label
    indices (default: the sorted synsets found). Tars missing from the map are skipped.
    """

    kind = "imagenet21k-tars"

    def __init__(self, root: str | Path, synset_map: str | Path | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"synset tar folder {root} does not exist")
        tars = sorted(root.glob("n*.tar"))
        if not tars:
            raise ValueError(f"{root} has no per-synset tars (n01234567.tar)")
        synsets = read_synset_map(synset_map) if synset_map else [t.stem for t in tars]
        label_of = {s: i for i, s in enumerate(synsets)}
        unmapped = [t.name for t in tars if t.stem not in label_of]
        if unmapped:
            log.warning("skipping %d tars not in the synset map: %s", len(unmapped), ", ".join(unmapped[:5]))
        self.tars = [t for t in tars if t.stem in label_of]
        self.class_names = synsets
        tar_ids, offsets, sizes, self.keys = [], [], [], []
        for t, path in enumerate(self.tars):
            with tarfile.open(path) as tar:
                members = sorted((m for m in tar if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES), key=lambda m: m.name)
            for m in members:
                tar_ids.append(t)
                offsets.append(m.offset_data)
                sizes.append(m.size)
                self.keys.append(key_of(m.name))
        self.tar_ids = np.array(tar_ids, dtype=np.int32)
        self.labels = np.array([label_of[t.stem] for t in self.tars], dtype=np.int64)
        self.offsets, self._bytes = np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64)
        self._open: tuple[int, int, object] | None = None  # (pid, tar id, file)

    def __len__(self) -> int:
        return len(self.keys)

    def sizes(self) -> np.ndarray:
        return _in_tar(self._bytes)

    def _file(self, t: int):
        if self._open is None or self._open[:2] != (os.getpid(), t):
            if self._open is not None and self._open[0] == os.getpid():
                self._open[2].close()
            self._open = (os.getpid(), t, open(self.tars[t], "rb"))
        return self._open[2]

    def load(self, i: int) -> Sample | None:
        t = int(self.tar_ids[i])
        f = self._file(t)
        f.seek(int(self.offsets[i]))
        data = f.read(int(self._bytes[i]))
        encoded = encoded_image(data, f"{self.tars[t]}:{self.keys[i]}")
        if encoded is None:
            return None
        return Sample(self.keys[i], encoded[0], encoded[1], int(self.labels[t]))


# ---------------------------------------------------------------- arrays of pixels

class _PixelArraySource(Source):
    """Images held as a uint8 array (N, H, W[, C]), encoded as PNG when loaded."""

    def __init__(self, prefix: str, images: np.ndarray, labels: np.ndarray, class_names: list[str]):
        self.prefix, self.images, self.labels, self.class_names = prefix, images, labels, class_names

    def __len__(self) -> int:
        return len(self.images)

    def sizes(self) -> np.ndarray:
        # raw pixel bytes: PNG is usually smaller, so shards come out under the target size
        return _in_tar(np.full(len(self), self.images[0].size, dtype=np.int64))

    def load(self, i: int) -> Sample:
        return Sample(f"{self.prefix}_{i:06d}", png_bytes(self.images[i]), "png", int(self.labels[i]))


def _read_idx(path: Path) -> np.ndarray:
    """IDX format (LeCun's MNIST files), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (expected magic 0x0000 08 nd)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


class FashionMnistSource(_PixelArraySource):
    """Fashion-MNIST IDX files (`train-images-idx3-ubyte.gz` ...), pixels stored as PNG."""

    kind = "fashion-mnist"

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        if split not in ("train", "test"):
            raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
        prefix = {"train": "train", "test": "t10k"}[split]
        found = {}
        for kind, name in (("images", "idx3"), ("labels", "idx1")):
            candidates = [root / f"{prefix}-{kind}-{name}-ubyte{ext}" for ext in (".gz", "")]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise FileNotFoundError(
                    f"no Fashion-MNIST {kind} for split {split!r} in {root} (expected {candidates[0].name}); "
                    "Debian's dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist"
                )
            found[kind] = _read_idx(path)
        if len(found["images"]) != len(found["labels"]):
            raise ValueError(f"{root}: {len(found['images'])} images but {len(found['labels'])} labels for split {split!r}")
        super().__init__(f"fmnist_{split}", found["images"], found["labels"], FASHION_MNIST_CLASSES)


def fashion_mnist(root: str | Path, split: str = "train", limit: int | None = None) -> Iterator[Sample]:
    source = FashionMnistSource(root, split)
    for i in range(len(source) if limit is None else min(limit, len(source))):
        yield source.load(i)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python files are pickles: allow only what they contain (numpy arrays, lists,
    dicts), so a planted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # protocol-2 bytes

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} does not exist (the official python version's layout is expected)")
    with open(path, "rb") as f:
        record = _CifarUnpickler(f, encoding="bytes").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in record.items()}


class CifarSource(_PixelArraySource):
    """CIFAR-10 (`cifar-10-batches-py/`) or CIFAR-100 (`cifar-100-python/`, fine labels),
    the official python pickles; `root` is that folder or its parent."""

    kind = "cifar"

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR has splits 'train' and 'test', not {split!r}")
        for folder in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
            if (folder / "batches.meta").is_file():
                files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
                names_key, labels_key, meta, prefix = "label_names", "labels", "batches.meta", "cifar10"
                break
            if (folder / "meta").is_file():
                files, names_key, labels_key, meta, prefix = [split], "fine_label_names", "fine_labels", "meta", "cifar100"
                break
        else:
            raise FileNotFoundError(f"{root} holds neither cifar-10-batches-py/batches.meta nor cifar-100-python/meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(folder / meta)[names_key]]
        batches = [_unpickle(folder / f) for f in files]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[labels_key], dtype=np.int64) for b in batches])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{folder}: expected rows of 3072 bytes (3x32x32), found shape {data.shape}")
        super().__init__(f"{prefix}_{split}", data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels, names)


# ---------------------------------------------------------------- by name

@dataclass(frozen=True)
class SourceOptions:
    split: str = "train"
    synset_map: str | None = None
    class_names: str | None = None
    image_root: str | None = None


SOURCES: dict[str, Callable[[str, SourceOptions], Source]] = {
    "imagefolder": lambda path, o: ImageFolderSource(path),
    "imagenet21k-tars": lambda path, o: SynsetTarsSource(path, o.synset_map),
    "label-list": lambda path, o: LabelListSource(path, o.class_names, o.image_root),
    "cifar": lambda path, o: CifarSource(path, o.split),
    "fashion-mnist": lambda path, o: FashionMnistSource(path, o.split),
}


def open_source(kind: str, path: str, options: SourceOptions) -> Source:
    if kind not in SOURCES:
        raise ValueError(f"unknown source {kind!r}; known: {', '.join(SOURCES)}")
    return SOURCES[kind](path, options)
