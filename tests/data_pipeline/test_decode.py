"""Worker-side decoding and augmentation: the fast JPEG path matches the slow one within a
stated tolerance, augmentations are a function of the seed, batches are normalised and
mixed as timm does."""
from __future__ import annotations

import io

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from data_pipeline.config import NORMALIZATION, DataConfig
from data_pipeline.decode import (
    BadSample, BatchFinisher, ClassificationDecoder, ImagePipeline, _draft, build_mixup, crop_box, normalize_batch, seed_sample,
)
from tests.data_pipeline.conftest import photo_patches

# Fast vs slow path, in 0..255 grey levels: mean absolute difference per image at most
# FAST_PATH_MAX, and over all images at most FAST_PATH_MEAN.
FAST_PATH_MAX = 6.0
FAST_PATH_MEAN = 1.5


def test_fast_jpeg_path_matches_full_decode_within_tolerance():
    jpegs = photo_patches(24, low=160, high=400, seed=5)
    fast = ImagePipeline(64, "inception", fast_jpeg=True)
    slow = ImagePipeline(64, "inception", fast_jpeg=False)
    diffs, reduced = [], 0
    for i, data in enumerate(jpegs):
        seed_sample(i)
        a = fast(data, "x").astype(np.float64)
        seed_sample(i)
        b = slow(data, "x").astype(np.float64)
        diffs.append(np.abs(a - b).mean())
        seed_sample(i)
        img = Image.open(io.BytesIO(data))
        box = crop_box(img, "inception", scale=fast.scale, ratio=fast.ratio, crop_pct=1.0)
        reduced += _draft(img, box, (64, 64)) != box  # libjpeg decoded at 1/2, 1/4 or 1/8
    assert reduced >= len(jpegs) // 3  # the fast path was really taken
    assert max(diffs) <= FAST_PATH_MAX and np.mean(diffs) <= FAST_PATH_MEAN, diffs


def test_augmentation_is_a_function_of_the_seed(photos):
    pipeline = ImagePipeline(32, "inception", randaugment="rand-m9-mstd0.5")
    outputs = []
    for seed in (1, 1, 2):
        seed_sample(seed)
        outputs.append(pipeline(photos[0], "x"))
    assert np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[0], outputs[2])
    assert outputs[0].shape == (32, 32, 3) and outputs[0].dtype == np.uint8
    flips = ImagePipeline(16, "flip")
    seen = set()
    for seed in range(12):
        seed_sample(seed)
        seen.add(flips(photos[1], "x").tobytes())
    assert len(seen) == 2  # flipped or not, nothing else changes


def test_center_crop_and_undecodable_bytes(photos):
    img = Image.open(io.BytesIO(photos[2]))
    left, top, right, bottom = crop_box(img, "center", scale=None, ratio=None, crop_pct=0.5)
    assert right - left == bottom - top == min(img.size) * 0.5
    with pytest.raises(BadSample, match="undecodable: shard.tar:k"):
        ImagePipeline(16)(photos[0][:100], "shard.tar:k")


def test_batch_normalisation_matches_torchvision_on_the_host_or_after_the_copy(photos):
    mean, std = NORMALIZATION["imagenet"]
    pipeline = ImagePipeline(24)
    images = [pipeline(p, "x") for p in photos[:4]]
    reference = torch.stack([T.Compose([T.ToTensor(), T.Normalize(mean, std)])(Image.fromarray(i)) for i in images])
    host, targets = BatchFinisher(mean, std)(images, [0, 1, 2, 3])  # what a worker hands over by default
    assert host.dtype == torch.uint8 and host.shape == (4, 3, 24, 24) and targets.tolist() == [0, 1, 2, 3]
    on_device = normalize_batch(host, mean, std, device=torch.device("cpu"))
    in_worker, _ = BatchFinisher(mean, std, host_dtype="float32")(images, [0, 1, 2, 3])
    for batch in (on_device, in_worker):
        assert batch.dtype == torch.float32 and torch.allclose(batch, reference, atol=1e-5)
    assert host.untyped_storage().nbytes() * 4 == in_worker.untyped_storage().nbytes()  # a quarter of the bytes


@pytest.mark.parametrize("multi", [False, True])
def test_mixup_makes_soft_targets_on_the_batch(photos, multi):
    mixup = build_mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=5, multi_label=multi)
    finish = BatchFinisher((0.5,) * 3, (0.5,) * 3, mixup)
    images = [ImagePipeline(16)(p, "x") for p in photos[:4]]
    if multi:
        targets = list(np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=np.float32))
    else:
        targets = [0, 1, 3, 4]
    plain, _ = BatchFinisher((0.5,) * 3, (0.5,) * 3)(images, targets)
    torch.manual_seed(0)
    np.random.seed(0)
    batch, soft = finish(images, targets)
    assert soft.shape == (4, 5) and soft.dtype == torch.float32
    assert batch.dtype == torch.uint8 and batch.shape == plain.shape  # mixed as uint8, timm's FastCollateMixup
    assert not torch.equal(batch, plain)  # images were mixed with the reversed batch
    if not multi:
        assert torch.allclose(soft.sum(1), torch.ones(4)) and (soft[:, 2] < 0.05).all()
        assert torch.allclose(soft[0, 0] + soft[0, 4], torch.tensor(1 - 3 * 0.1 / 5), atol=1e-6)


def test_classification_decoder_checks_labels_before_decoding(photos):
    decoder = ClassificationDecoder(transform=None, num_classes=3, label_mode="multi", pipeline=ImagePipeline(8))
    image, target = decoder({"__url__": "s.tar", "__key__": "k", "jpg": photos[0], "labels.json": b"[0, 2]"})
    assert image.shape == (8, 8, 3) and target.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(BadSample, match=r"bad_label: s.tar:k: labels \[5\]"):
        decoder({"__url__": "s.tar", "__key__": "k", "jpg": b"garbage", "cls": b"5"})
    with pytest.raises(BadSample, match="no_label"):
        decoder({"__url__": "s.tar", "__key__": "k", "jpg": photos[0]})


def test_config_names_normalisation_and_checks_mixup():
    cfg = DataConfig(train_urls="x", num_classes=3, normalize="clip")
    assert cfg.mean == NORMALIZATION["clip"][0] and cfg.std == NORMALIZATION["clip"][1]
    with pytest.raises(pydantic.ValidationError, match="not both"):
        DataConfig(train_urls="x", num_classes=3, normalize="clip", mean=(0, 0, 0))
    with pytest.raises(pydantic.ValidationError, match="must be even"):
        DataConfig(train_urls="x", num_classes=3, batch_size=5, mixup_alpha=0.2)
    with pytest.raises(pydantic.ValidationError, match="not a timm RandAugment string"):
        DataConfig(train_urls="x", num_classes=3, randaugment="augmix-m5")
