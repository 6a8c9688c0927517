import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from data_pipeline.decode import BadSample
from pretrain.tasks.detection.config import CocoSource, ShardSource
from pretrain.tasks.detection.data import (
    DetectionTransform, MapBatches, ShardBoxesDecoder, coco_dataset, eval_loader, pack_target, train_batches, unpack_targets,
)
from pretrain.tasks.detection.shapes import coco_to_shards, write_shapes

PLAIN = DetectionTransform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, num_images=12, image_size=40, num_classes=2, max_objects=3, seed=3)
    return root


def test_pack_unpack_round_trip_and_truncation():
    labels, boxes = torch.tensor([1, 0, 1]), torch.tensor([[0.5, 0.5, 0.2, 0.1], [0.2, 0.3, 0.1, 0.1], [0.8, 0.8, 0.1, 0.2]])
    (full,) = unpack_targets(pack_target(labels, boxes, width=640, height=480, max_objects=5)[None])
    (cut,) = unpack_targets(pack_target(labels, boxes, width=10, height=20, max_objects=2)[None])
    assert full["labels"].tolist() == [1, 0, 1] and torch.equal(full["boxes"], boxes)
    assert full["size"].tolist() == [640, 480]
    assert cut["labels"].tolist() == [1, 0] and torch.equal(cut["boxes"], boxes[:2])


def test_transform_normalises_clips_and_flips():
    image = Image.new("RGB", (100, 50))
    image.paste((255, 0, 0), (0, 0, 50, 50))  # left half red
    labels = torch.tensor([0, 1, 0])
    boxes = torch.tensor([[10.0, 5.0, 20.0, 10.0], [90.0, 40.0, 30.0, 30.0], [5.0, 5.0, 0.0, 3.0]])  # 2nd overflows, 3rd empty
    tensor, kept, out = PLAIN(image, labels, boxes)
    assert tensor.shape == (3, 32, 32) and kept.tolist() == [0, 1]
    assert out[0].tolist() == pytest.approx([0.2, 0.2, 0.2, 0.2])
    assert out[1].tolist() == pytest.approx([0.95, 0.9, 0.1, 0.2])  # clipped to the image

    flipping = DetectionTransform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), hflip=True)
    torch.manual_seed(0)
    results = [flipping(image, labels, boxes) for _ in range(20)]
    flipped = [(t, b) for t, _, b in results if t[0, 0, -1] > 0.5]  # red moved to the right
    assert 0 < len(flipped) < 20
    assert all(b[0, 0].item() == pytest.approx(0.8) for _, b in flipped)


def test_coco_source_maps_sparse_categories_and_skips_crowds(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 5, "file_name": "a.png", "width": 20, "height": 10}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [0, 0, 10, 5], "area": 50, "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [10, 5, 10, 5], "area": 50, "iscrowd": 0},
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 0, 20, 10], "area": 200, "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    dataset = coco_dataset(tmp_path / "ann.json", tmp_path, transform=PLAIN, num_classes=2, max_objects=10)
    _, packed = dataset[0]
    (target,) = unpack_targets(packed[None])
    assert target["labels"].tolist() == [1, 0]  # id 7 -> 1, id 3 -> 0 (sorted ids)
    assert target["boxes"].flatten().tolist() == pytest.approx([0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 0.5, 0.5])
    assert target["size"].tolist() == [20, 10]

    with pytest.raises(ValueError, match="2 categories but data.num_classes=3"):
        coco_dataset(tmp_path / "ann.json", tmp_path, transform=PLAIN, num_classes=3, max_objects=10)
    with pytest.raises(FileNotFoundError, match="missing.json not found"):
        coco_dataset(tmp_path / "missing.json", tmp_path, transform=PLAIN, num_classes=2, max_objects=10)


def test_shards_carry_the_same_targets_as_coco(shapes, tmp_path):
    urls = coco_to_shards(shapes / "annotations.json", shapes / "images", tmp_path, samples_per_shard=5)
    assert urls.endswith("shard-{000000..000002}.tar")
    common = dict(transform=PLAIN, num_classes=2, max_objects=4, batch_size=4, num_workers=0)
    from_coco = [p for _, packed in eval_loader(CocoSource(annotations=str(shapes / "annotations.json"), images=str(shapes / "images")),
                                                rank=0, world_size=1, **common) for p in packed]
    from_shards = [p for _, packed in eval_loader(ShardSource(urls=urls), rank=0, world_size=1, **common) for p in packed]
    assert len(from_coco) == len(from_shards) == 12
    assert all(torch.allclose(a, b) for a, b in zip(from_coco, from_shards))

    # Two ranks split the validation images between them, each exactly once.
    halves = [[p for _, packed in eval_loader(ShardSource(urls=urls), rank=r, world_size=2, **common) for p in packed] for r in (0, 1)]
    assert [len(h) for h in halves] == [6, 6]
    assert all(torch.allclose(a, b) for a, b in zip(halves[0] + halves[1], from_shards[0::2] + from_shards[1::2]))

    # Training batches stream from the shards through the project's resumable stream.
    batches = iter(train_batches(ShardSource(urls=urls), rank=0, world_size=1, seed=0, shuffle_buffer=8, max_bad_fraction=0.0, **common))
    images, packed = next(batches)
    assert images.shape == (4, 3, 32, 32) and packed.shape == (4, 5, 5)


def test_bad_shard_samples_are_named():
    decoder = ShardBoxesDecoder(transform=PLAIN, num_classes=2, max_objects=4)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    sample = {"__key__": "k", "__url__": "s.tar", "png": buf.getvalue()}
    with pytest.raises(BadSample, match="s.tar:k has no .json"):
        decoder(sample)
    with pytest.raises(BadSample, match="expected"):
        decoder({**sample, "json": b'{"boxes": [[0, 0, 1]], "labels": [0]}'})
    with pytest.raises(BadSample, match="classes 0..1"):
        decoder({**sample, "json": b'{"boxes": [[0, 0, 1, 1]], "labels": [2]}'})
    _, packed = decoder({**sample, "json": b'{"boxes": [[0, 0, 4, 4]], "labels": [1]}'})
    assert packed[1].tolist() == pytest.approx([1, 0.25, 0.25, 0.5, 0.5])


def test_map_batches_resume_where_they_stopped(shapes):
    dataset = coco_dataset(shapes / "annotations.json", shapes / "images", transform=PLAIN, num_classes=2, max_objects=4)
    loader = MapBatches(dataset, batch_size=4, rank=0, world_size=1, num_workers=0, seed=1)
    stream = iter(loader)
    first = [next(stream)[1] for _ in range(4)]  # crosses the epoch boundary (3 batches per epoch)
    state = loader.state_dict()
    expected = [next(stream)[1] for _ in range(3)]

    resumed = MapBatches(dataset, batch_size=4, rank=0, world_size=1, num_workers=0, seed=1)
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert all(torch.equal(next(again)[1], e) for e in expected)
    assert not torch.equal(first[0], first[3]), "a new epoch is a new order"
    with pytest.raises(ValueError, match="fewer than one batch"):
        MapBatches(dataset, batch_size=8, rank=0, world_size=2, num_workers=0, seed=1)


def test_write_shapes_is_reused_and_valid(shapes):
    coco = json.loads((shapes / "annotations.json").read_text())
    assert len(coco["images"]) == 12 and {c["name"] for c in coco["categories"]} == {"rectangle", "ellipse"}
    assert all(a["id"] > 0 and 0 < a["bbox"][2] <= 40 for a in coco["annotations"])
    stamp = (shapes / "annotations.json").stat().st_mtime_ns
    write_shapes(shapes, num_images=12, image_size=40, num_classes=2, max_objects=3, seed=3)
    assert (shapes / "annotations.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="1 to 3 classes"):
        write_shapes(shapes, num_images=1, num_classes=4)
