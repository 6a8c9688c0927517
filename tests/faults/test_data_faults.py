"""Hostile and broken shards streamed by the trainer's loader, with real worker processes."""
from __future__ import annotations

import itertools
import tarfile

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.sample import Sample
from data_pipeline.writer import write_split
from tests.data_pipeline.conftest import photo_patches
from tests.data_pipeline.test_shards import claim_size
from tests.data_pipeline.test_stream import rewrite_tar


def loader_for(urls: str, workers: int = 2):
    cfg = DataConfig(train_urls=urls, batch_size=4, num_workers=workers, shuffle_buffer=8, image_size=32, num_classes=3,
                     augment="flip", max_corrupt_fraction=0.5)
    return build_loader(cfg, rank=0, world_size=1, urls=urls, train=True)


@pytest.mark.timeout(120)
def test_truncated_corrupt_unlabelled_and_10_gb_members_are_skipped_and_counted(tmp_path):
    """in 4 shards of 10: one cut mid-way, a corrupt JPEG, a sample without its label, a member header claiming 10 GB | those samples (and the rest of the broken shards) | skipped, counted per kind in `bad_counts`, every batch full; no worker dies, nothing hangs"""
    photos = photo_patches(40)
    write_split((Sample(f"p_{i:03d}", photos[i], "jpg", i % 3) for i in range(40)), tmp_path, prefix="train", samples_per_shard=10)
    rewrite_tar(tmp_path / "train-000000.tar", lambda m: m.update({"p_003.jpg": m["p_003.jpg"][:300]}))
    rewrite_tar(tmp_path / "train-000001.tar", lambda m: m.pop("p_012.cls"))
    data = (tmp_path / "train-000002.tar").read_bytes()
    (tmp_path / "train-000002.tar").write_bytes(data[: len(data) * 6 // 10])
    claim_size(tmp_path / "train-000003.tar", member=6, size=10 * 2**30)  # sample p_033's image
    loader = loader_for(str(tmp_path / "train-{000000..000003}.tar"))
    batches = list(itertools.islice(iter(loader), loader.stream.batches_per_epoch()))
    assert len(batches) == 10 and all(images.shape == (4, 3, 32, 32) for images, _ in batches)
    # the cut shard loses what follows the cut; the 10 GB claim, the rest of its shard (p_033 to p_039 and the header)
    assert dict(loader.bad_counts) == {"undecodable": 1, "no_label": 1, "truncated_shard": 2, "oversized_member": 8}


@pytest.mark.timeout(60)
def test_an_empty_url_list_and_a_zero_sample_shard_set_are_clear_errors(tmp_path):
    """an empty URL list; a shard set whose tars hold no sample | nothing | a ValueError naming the pattern, at once (no worker started, no hang)"""
    with pytest.raises(ValueError, match="names no shards"):
        loader_for("")
    with tarfile.open(tmp_path / "empty-000000.tar", "w"):
        pass
    with pytest.raises(ValueError, match="hold no samples"):
        loader_for(str(tmp_path / "empty-000000.tar"))
