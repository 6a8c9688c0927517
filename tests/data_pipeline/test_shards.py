"""Hostile shards: a member header that claims 10 GB is refused before anything is allocated,
and the stream counts it and goes on."""
from __future__ import annotations

import itertools
import tarfile
import tracemalloc

import pytest
import torch

from data_pipeline.sample import Sample
from data_pipeline.shards import MAX_MEMBER_BYTES, OversizedMember, ShardCursor, iter_tar_samples
from data_pipeline.storage import open_url
from data_pipeline.stream import ShardStream, StreamLoader, open_shard_set
from data_pipeline.writer import write_split


def claim_size(path, member: int, size: int) -> None:
    """Rewrite the size field of the tar header of member `member` (GNU base-256) and its checksum."""
    data = bytearray(path.read_bytes())
    at = 0
    for _ in range(member):  # walk the headers: 512 + data rounded up to 512
        at += 512 + (int(data[at + 124 : at + 136].split(b"\0")[0].strip() or b"0", 8) + 511) // 512 * 512
    data[at + 124 : at + 136] = b"\x80" + size.to_bytes(11, "big")
    data[at + 148 : at + 156] = b" " * 8
    data[at + 148 : at + 156] = f"{sum(data[at : at + 512]):06o}\0 ".encode()
    path.write_bytes(bytes(data))


@pytest.fixture
def crafted(tmp_path):
    """Two shards of 6 samples; shard 1's third image claims 10 GB."""
    write_split((Sample(f"s_{i:03d}", b"\x89PNG", "png", i % 2) for i in range(12)), tmp_path, prefix="t", samples_per_shard=6)
    claim_size(tmp_path / "t-000001.tar", member=4, size=10 * 2**30)  # members s_006.png, s_006.cls, s_007..., s_008.png
    return tmp_path


def test_a_member_claiming_10_gb_is_refused_without_allocating_it(crafted):
    url = str(crafted / "t-000001.tar")
    tracemalloc.start()
    with pytest.raises(OversizedMember, match=f"claims 10737418240 bytes, over the {MAX_MEMBER_BYTES}-byte limit"), open_url(url) as f:
        got = []
        got.extend(iter_tar_samples(f, url))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20 and [g["__key__"] for g in got] == ["s_006"]  # s_007 ends where s_008 would begin
    cursor = ShardCursor(url, open_url)
    tail = cursor.read(0, 6)[1:]
    cursor.close()
    assert {s.reason for s in tail} == {"oversized_member"}


def test_the_stream_counts_an_oversized_member_and_goes_on(crafted):
    def label(sample):
        return torch.zeros(1), torch.tensor(int(sample["cls"]))

    stream = ShardStream(open_shard_set(str(crafted / "t-{000000..000001}.tar")), label, batch_size=2, rank=0, world_size=1,
                         num_workers=0, seed=0, shuffle_buffer=4, max_bad_fraction=0.5, lanes=2)
    loader = StreamLoader(stream, num_workers=0)
    batches = list(itertools.islice(iter(loader), stream.batches_per_epoch()))
    assert len(batches) == 6 and dict(loader.bad_counts) == {"oversized_member": 5}


@pytest.mark.parametrize("pattern", ["", " :: "])
def test_an_empty_url_list_is_a_clear_error(pattern):
    with pytest.raises(ValueError, match="names no shards"):
        open_shard_set(pattern)


def test_a_shard_set_without_samples_is_a_clear_error_not_a_hang(tmp_path):
    with tarfile.open(tmp_path / "empty-000000.tar", "w"):
        pass
    shards = open_shard_set(str(tmp_path / "empty-000000.tar"))
    with pytest.raises(ValueError, match="hold no samples"):
        ShardStream(shards, None, batch_size=2, rank=0, world_size=1, num_workers=0, seed=0, shuffle_buffer=4, max_bad_fraction=0)
