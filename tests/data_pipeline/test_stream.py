"""Exact per-rank batches, exactly-once coverage, and mid-epoch resume of the shard stream."""
from __future__ import annotations

import itertools

import pytest
import torch

from data_pipeline.sample import Sample
from data_pipeline.stream import ShardStream, StreamLoader, open_shard_set
from data_pipeline.writer import write_split


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


def make_loader(pattern, *, rank, world, workers, batch=4, seed=3, buffer=8):
    stream = ShardStream(
        open_shard_set(pattern), key_id, batch_size=batch, rank=rank, world_size=world,
        num_workers=workers, seed=seed, shuffle_buffer=buffer, max_bad_fraction=0.0,
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
