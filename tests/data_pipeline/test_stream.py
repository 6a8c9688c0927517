"""Exact per-rank batches, exactly-once coverage, and mid-epoch resume of the shard stream."""
from __future__ import annotations

import io
import itertools
import shutil
import tarfile

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.plan import EpochPlan, Generation, block_permutation, real_items
from data_pipeline.sample import Sample
from data_pipeline.shards import iter_tar_samples
from data_pipeline.stream import ShardStream, StreamLoader, TooManyBadSamples, open_shard_set
from data_pipeline.writer import write_split
from tests.data_pipeline.conftest import photo_patches


def key_id(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a sample to its integer id, so tests can see which samples were read."""
    return torch.tensor(int(sample["__key__"].split("_")[1])), torch.tensor(int(sample["cls"]))


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """5 shards of uneven sizes, 83 samples."""
    out = tmp_path_factory.mktemp("uneven")
    sizes = [30, 7, 19, 4, 23]
    ids = itertools.count()
    for i, n in enumerate(sizes):
        samples = [Sample(f"s_{next(ids):05d}", b"x", "png", 0) for _ in range(n)]
        write_split(samples, out, prefix=f"part{i}", split=f"part{i}", samples_per_shard=n)
    pattern = str(out / "part{0..4}-000000.tar")
    return pattern, sum(sizes)


def make_loader(pattern, *, rank, world, workers, batch=4, seed=3, buffer=8, lanes=3):
    stream = ShardStream(
        open_shard_set(pattern), key_id, batch_size=batch, rank=rank, world_size=world,
        num_workers=workers, seed=seed, shuffle_buffer=buffer, max_bad_fraction=0.0, lanes=lanes,
    )
    return StreamLoader(stream, num_workers=workers)


def take(loader, n):
    return [ids.tolist() for ids, _ in itertools.islice(iter(loader), n)]


def test_ranks_get_equal_batches_and_cover_every_sample_once(uneven_shards):
    pattern, total = uneven_shards
    loaders = [make_loader(pattern, rank=r, world=2, workers=2) for r in range(2)]
    per_epoch = loaders[0].stream.batches_per_epoch()
    assert per_epoch == loaders[1].stream.batches_per_epoch()
    assert per_epoch * 4 * 2 >= total > (per_epoch - 2) * 4 * 2  # padding below one batch per slot
    seen = [sum(take(l, per_epoch), []) for l in loaders]
    union = seen[0] + seen[1]
    assert set(union) == set(range(total))
    assert len(union) - total < 2 * 2 * 4  # the few repeats pad the last slots


def test_order_is_a_function_of_seed_and_epoch(uneven_shards):
    pattern, _ = uneven_shards
    a = take(make_loader(pattern, rank=0, world=2, workers=2, seed=1), 12)
    b = take(make_loader(pattern, rank=0, world=2, workers=2, seed=1), 12)
    c = take(make_loader(pattern, rank=0, world=2, workers=2, seed=2), 12)
    assert a == b and a != c
    per_epoch = make_loader(pattern, rank=0, world=2, workers=2).stream.batches_per_epoch()
    two_epochs = take(make_loader(pattern, rank=0, world=2, workers=2, seed=1), 2 * per_epoch)
    assert two_epochs[:per_epoch] != two_epochs[per_epoch:]  # reshuffled each epoch


def test_fewer_shards_than_slots(uneven_shards):
    pattern, _ = uneven_shards
    one = pattern.replace("{0..4}", "3")  # a single shard of 4 samples over 3 ranks x 2 workers
    loaders = [make_loader(one, rank=r, world=3, workers=2, batch=2) for r in range(3)]
    got = [sum(take(l, l.stream.batches_per_epoch()), []) for l in loaders]
    assert len({len(g) for g in got}) == 1
    assert set(sum(got, [])) == {56, 57, 58, 59}  # ids of shard 3


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_the_same_sequence(uneven_shards, workers):
    pattern, _ = uneven_shards
    full = take(make_loader(pattern, rank=1, world=2, workers=workers), 9)
    first = make_loader(pattern, rank=1, world=2, workers=workers)
    head = take(first, 4)
    resumed = make_loader(pattern, rank=1, world=2, workers=workers)
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 5) == full


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 3)])
def test_resume_on_another_world_size_neither_repeats_nor_loses(uneven_shards, old_world, new_world):
    pattern, total = uneven_shards
    old = [make_loader(pattern, rank=r, world=old_world, workers=2) for r in range(old_world)]
    consumed = sum((sum(take(l, 3), []) for l in old), [])
    state = old[0].state_dict()
    new = [make_loader(pattern, rank=r, world=new_world, workers=2) for r in range(new_world)]
    for l in new:
        l.load_state_dict(state)
    rest = sum((sum(take(l, l.stream.batches_per_epoch()), []) for l in new), [])
    assert set(consumed) | set(rest) == set(range(total))
    assert len(set(consumed) & set(rest)) == 0


# ---------------------------------------------------------------- real photos through build_loader

def rewrite_tar(path, edit) -> None:
    """Apply `edit(members dict)` to a shard in place."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    edit(members)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """4 shards of 10 JPEG photos, labels i % 3."""
    out = tmp_path_factory.mktemp("photos")
    jpegs = photo_patches(40, seed=7)
    write_split((Sample(f"p_{i:03d}", j, "jpg", i % 3) for i, j in enumerate(jpegs)), out, prefix="train", samples_per_shard=10)
    return out


def data_config(urls, **overrides) -> DataConfig:
    base = dict(train_urls=urls, batch_size=4, num_workers=0, shuffle_buffer=8, image_size=32, num_classes=3,
                augment="inception", max_corrupt_fraction=0.5)
    return DataConfig(**(base | overrides))


def test_corrupt_samples_are_skipped_counted_and_logged(photo_shards, tmp_path, caplog):
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar", "_info.json"):
        shutil.copy(photo_shards / name, tmp_path / name)
    rewrite_tar(tmp_path / "train-000000.tar", lambda m: m.update({"p_003.jpg": m["p_003.jpg"][:300]}))
    rewrite_tar(tmp_path / "train-000001.tar", lambda m: m.update({"p_012.cls": b"9", "p_015.cls": b"x"}))
    data = (tmp_path / "train-000002.tar").read_bytes()
    (tmp_path / "train-000002.tar").write_bytes(data[: len(data) * 6 // 10])  # cut mid-shard
    with pytest.raises(EOFError), open(tmp_path / "train-000002.tar", "rb") as f:
        readable = []
        readable.extend(iter_tar_samples(f, "x"))
    urls = str(tmp_path / "train-{000000..000003}.tar")
    loaders = [build_loader(data_config(urls), rank=r, world_size=2, urls=urls, train=True) for r in range(2)]
    counts = []
    for loader in loaders:
        n = loader.stream.batches_per_epoch()
        batches = list(itertools.islice(iter(loader), n))
        assert all(images.shape == (4, 3, 32, 32) for images, _ in batches)
        counts.append(len(batches))
    assert counts[0] == counts[1] == 5  # 40 samples over 2 ranks: bad ones were substituted, not dropped
    bad = loaders[0].bad_counts + loaders[1].bad_counts
    assert dict(bad) == {"undecodable": 1, "bad_label": 2, "truncated_shard": 10 - len(readable)}
    assert "train-000000.tar:p_003" in caplog.text and "train-000001.tar:p_012" in caplog.text
    assert f"train-000002.tar: sample {len(readable)} of the shard is unreadable" in caplog.text

    strict = build_loader(data_config(urls, max_corrupt_fraction=0.05), rank=0, world_size=1, urls=urls, train=True)
    with pytest.raises(TooManyBadSamples, match="max_corrupt_fraction=0.05"):
        list(itertools.islice(iter(strict), strict.stream.batches_per_epoch()))


def test_mixup_batches_resume_bit_for_bit(photo_shards):
    urls = str(photo_shards / "train-{000000..000003}.tar")
    cfg = data_config(urls, mixup_alpha=0.8, cutmix_alpha=1.0, randaugment="rand-m9-mstd0.5", num_workers=2)
    full = list(itertools.islice(iter(build_loader(cfg, rank=0, world_size=1, urls=urls, train=True)), 6))
    first = build_loader(cfg, rank=0, world_size=1, urls=urls, train=True)
    head = list(itertools.islice(iter(first), 2))
    resumed = build_loader(cfg, rank=0, world_size=1, urls=urls, train=True)
    resumed.load_state_dict(first.state_dict())
    rest = list(itertools.islice(iter(resumed), 4))
    for (a, ta), (b, tb) in zip(full, head + rest):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert full[0][1].shape == (4, 3) and torch.allclose(full[0][1].sum(1), torch.ones(4))


def test_stream_from_s3_survives_dropped_connections(photo_shards, s3_server, s3_dropping_proxy, monkeypatch):
    from data_pipeline import storage

    bucket = s3_server.create_bucket()
    for path in photo_shards.iterdir():
        s3_server.client().put_object(Bucket=bucket, Key=f"photos/{path.name}", Body=path.read_bytes())
    for name, value in s3_dropping_proxy.s3.env().items():
        monkeypatch.setenv(name, value)
    storage._s3_client_for.cache_clear()
    local = str(photo_shards / "train-{000000..000003}.tar")
    remote = f"s3://{bucket}/photos/train-{{000000..000003}}.tar"
    s3_dropping_proxy.drop_after(20_000, times=3)  # a shard is ~25 kB: cuts land mid-shard
    got = list(itertools.islice(iter(build_loader(data_config(remote), rank=0, world_size=1, urls=remote, train=True)), 10))
    want = list(itertools.islice(iter(build_loader(data_config(local), rank=0, world_size=1, urls=local, train=True)), 10))
    assert s3_dropping_proxy.drops == 3
    assert all(torch.equal(a, b) and torch.equal(ta, tb) for (a, ta), (b, tb) in zip(got, want))
    storage._s3_client_for.cache_clear()


def test_plan_memory_does_not_grow_with_samples():
    """300M samples in 30k shards over 4096 slots: a slot's piece is a few segments, also after
    a resume on another world size (at most one shuffle block of single positions per old slot)."""
    lengths = np.full(30_000, 10_000)
    gens = [Generation(512, 8, 64, consumed_batches=1001), Generation(384, 8, 64)]
    before = EpochPlan(lengths, seed=0, epoch=0, generations=gens[:1], lanes=64, buffer=1000)
    assert max(len(before.piece(0, s).segments) for s in (0, 1, 4095)) <= 2
    after = EpochPlan(lengths, seed=0, epoch=0, generations=gens, lanes=64, buffer=1000)
    pieces = [after.piece(1, s) for s in (0, 1000, 3071)]
    assert all(len(p.segments) <= 2 * 1000 + 2 * 64 for p in pieces)
    real = real_items(300_000_000, 4096, 64)
    padded = int(np.flatnonzero((real > 0) & (real < real[0]))[0])
    consumed = sum(min(gens[0].slot_consumed(s), int(real[s])) for s in range(4096) if s != padded)
    assert after.total(1) == 300_000_000 - consumed - consumed_real(before, padded)


def consumed_real(plan, slot):
    """Samples (padding excluded) slot `slot` of generation 0 handed out, by replaying its read order."""
    piece, blocks, n = plan.piece(0, slot), plan.blocks(0, slot), plan.generations[0].slot_consumed(slot)
    emitted, b = [], 0
    while sum(map(len, emitted)) < n:
        idx, _ = blocks.items(b)
        emitted.append(idx[block_permutation(len(idx), *plan.key(0, slot), b)])
        b += 1
    return int((np.concatenate(emitted)[:n] < piece.real).sum())


def test_in_process_stream_leaves_the_trainers_random_state_alone(photo_shards):
    import random

    import numpy as np

    urls = str(photo_shards / "train-{000000..000003}.tar")
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = torch.rand(1), random.random(), np.random.rand()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    batches = iter(build_loader(data_config(urls, randaugment="rand-m9-mstd0.5"), rank=0, world_size=1, urls=urls, train=True))
    next(batches)
    next(batches)
    assert (torch.rand(1), random.random(), np.random.rand()) == expected


def test_a_worker_holds_at_most_lanes_open_shards_and_one_block(tmp_path):
    """The bound plan.py states: `lanes` open shards and `buffer + lanes` raw samples per worker."""
    from data_pipeline.plan import slot_order
    from data_pipeline.storage import open_url

    write_split((Sample(f"s_{i:04d}", b"x", "png", 0) for i in range(280)), tmp_path, prefix="t", samples_per_shard=7)
    opened, most = set(), [0]

    def counting_open(url):
        f = open_url(url)
        close = f.close
        opened.add(id(f))
        most[0] = max(most[0], len(opened))

        def closing():
            opened.discard(id(f))
            close()
        f.close = closing
        return f

    stream = ShardStream(open_shard_set(str(tmp_path / "t-{000000..000039}.tar")), key_id, batch_size=4, rank=0, world_size=1,
                         num_workers=0, seed=0, shuffle_buffer=10, max_bad_fraction=0, lanes=4, opener=counting_open)
    ids = sum(take(StreamLoader(stream, num_workers=0), stream.batches_per_epoch()), [])
    assert sorted(ids) == list(range(280)) and most[0] == 4 and not opened
    piece, blocks = stream.plan().current(0)
    sizes = [len(p) for p, *_ in slot_order(piece, blocks, skip=0, key=(0, 0, 0, 0))]
    assert sum(sizes) == 280 and max(sizes) <= 10 + 4
