"""A small generated detection set: coloured shapes on noise, as COCO JSON (+ WebDataset shards).

Class i is the i-th shape kind, so a detector must tell shapes apart, not colours.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.storage import write_atomic

# Class i draws SHAPES' i-th entry into the box (x0, y0, x1, y1), x1/y1 exclusive.
SHAPES = {
    "rectangle": lambda draw, x0, y0, x1, y1, fill: draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill),
    "ellipse": lambda draw, x0, y0, x1, y1, fill: draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill),
    "triangle": lambda draw, x0, y0, x1, y1, fill: draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill),
}
KINDS = list(SHAPES)


def _iou(a: tuple, b: tuple) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def shapes_image(rng: np.random.Generator, *, image_size: int, num_classes: int, max_objects: int) -> tuple[Image.Image, list[dict]]:
    """One image and its objects [{"bbox": [x, y, w, h], "category_id": class}]."""
    pixels = rng.integers(0, 96, (image_size, image_size, 3), dtype=np.uint8)  # dim noise under bright shapes
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):  # keep shapes mostly apart so every box is visible
            w, h = (int(v) for v in rng.integers(image_size // 5, image_size // 2, 2))
            x0, y0 = int(rng.integers(0, image_size - w)), int(rng.integers(0, image_size - h))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_iou(box, other) < 0.1 for other in placed):
                break
        else:
            continue
        cls = int(rng.integers(num_classes))
        SHAPES[KINDS[cls]](draw, *box, fill=tuple(int(c) for c in rng.integers(144, 256, 3)))
        placed.append(box)
        objects.append({"bbox": [x0, y0, w, h], "category_id": cls})
    return image, objects


def write_shapes(root: str | Path, *, num_images: int, image_size: int = 64, num_classes: int = 2,
                 max_objects: int = 3, seed: int = 0) -> Path:
    """`root/images/*.png` + `root/annotations.json` (COCO); kept if already written with the same settings."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"the shapes set has 1 to {len(SHAPES)} classes ({', '.join(KINDS)}), not {num_classes}")
    root = Path(root)
    settings = dict(num_images=num_images, image_size=image_size, num_classes=num_classes, max_objects=max_objects, seed=seed)
    ann_path = root / "annotations.json"
    if ann_path.is_file() and json.loads(ann_path.read_text()).get("info", {}).get("settings") == settings:
        return ann_path
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        image, objects = shapes_image(rng, image_size=image_size, num_classes=num_classes, max_objects=max_objects)
        name = f"{i:06d}.png"
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        write_atomic(root / "images" / name, buf.getvalue())
        images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
        for obj in objects:  # COCO ids start at 1: pycocotools treats id 0 as "unmatched"
            w, h = obj["bbox"][2:]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": obj["category_id"] + 1,
                                "bbox": obj["bbox"], "area": w * h, "iscrowd": 0})
    coco = {
        "info": {"description": "generated shapes", "settings": settings},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": KINDS[c]} for c in range(num_classes)],
    }
    write_atomic(ann_path, json.dumps(coco).encode())
    return ann_path


def coco_to_shards(annotations: str | Path, images: str | Path, out_dir: str | Path, *, prefix: str = "shard",
                   samples_per_shard: int = 1000) -> str:
    """Write a COCO set as WebDataset shards (`<key>.png|jpg` + `<key>.json` boxes); returns the URL pattern.

    Labels in the shards are the categories' 0-based index in sorted id order, as the COCO source maps them.
    """
    import tarfile

    from data_pipeline.writer import update_info

    coco = json.loads(Path(annotations).read_text())
    index = {cid: i for i, cid in enumerate(sorted(c["id"] for c in coco["categories"]))}
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image[ann["image_id"]].append(ann)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, lengths = [], []
    for start in range(0, len(coco["images"]), samples_per_shard):
        name = f"{prefix}-{len(names):06d}.tar"
        tmp = out_dir / f".{name}.tmp{os.getpid()}"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for img in coco["images"][start : start + samples_per_shard]:
                data = (Path(images) / img["file_name"]).read_bytes()
                anns = by_image[img["id"]]
                record = {"boxes": [a["bbox"] for a in anns], "labels": [index[a["category_id"]] for a in anns]}
                ext = Path(img["file_name"]).suffix.lstrip(".").lower()
                for field, payload in ((ext, data), ("json", json.dumps(record).encode())):
                    info = tarfile.TarInfo(f"{img['id']:09d}.{field}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        os.replace(tmp, out_dir / name)
        names.append(name)
        lengths.append(min(samples_per_shard, len(coco["images"]) - start))
    update_info(out_dir, {"name": prefix, "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths}, None)
    last = len(names) - 1
    return str(out_dir / f"{prefix}-{{000000..{last:06d}}}.tar") if last else str(out_dir / names[0])
