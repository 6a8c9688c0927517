"""Batches mix like i.i.d. draws: on a class-sorted set written with --no-shuffle (every shard one
class), at the trainer's defaults, also right after a resume; and the writer's default shuffle
gives every shard the global class mix."""
from __future__ import annotations

import io
import itertools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chi2_contingency

from data_pipeline.__main__ import main
from data_pipeline.config import DataConfig
from data_pipeline.inspection import scan_split
from data_pipeline.mixing import DEFAULTS, mixing, rank_batches
from data_pipeline.plan import Generation
from data_pipeline.sample import Sample
from data_pipeline.sources import ImageFolderSource, Source
from data_pipeline.stream import ShardStream, StreamLoader, open_shard_set
from data_pipeline.writer import read_info, write_source

BATCH, BUFFER, LANES, SEED = (DEFAULTS[k] for k in ("batch_size", "shuffle_buffer", "interleave_shards", "seed"))


def class_folders(root: Path, classes: int, per_class: int) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(buf, format="PNG")
    for c in range(classes):
        (root / f"c{c:03d}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c:03d}" / f"{i:03d}.png").write_bytes(buf.getvalue())
    return root


def shard_labels(root) -> list[np.ndarray]:
    split = read_info(root)["splits"]["train"] | {"name": "train"}
    return scan_split(str(root), split, total=split["num_samples"], wanted=set(), caption=str).shard_labels


class ClassSorted(Source):
    """`classes` x `per_class` tiny PNGs, class after class (an ImageFolder's order, without the files)."""

    kind = "class-sorted"

    def __init__(self, classes: int, per_class: int):
        self.per_class, self.n, self.class_names = per_class, classes * per_class, [f"c{c}" for c in range(classes)]
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(buf, format="PNG")
        self.png = buf.getvalue()

    def __len__(self) -> int:
        return self.n

    def sizes(self) -> np.ndarray:
        return np.full(self.n, 2048)

    def load(self, i: int) -> Sample:
        return Sample(f"s_{i:06d}", self.png, "png", i // self.per_class)


@pytest.fixture(scope="module")
def class_sorted():
    """128 classes x 480 images written with --no-shuffle, 30 per shard: 2048 one-class shards
    (on tmpfs where there is one: each shard's fsync is then free)."""
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        write_source(ClassSorted(128, 480), Path(tmp) / "shards", prefix="train", samples_per_shard=30, shuffle_seed=None)
        yield Path(tmp) / "shards", shard_labels(Path(tmp) / "shards")


def test_mixing_defaults_are_the_trainers():
    fields = DataConfig.model_fields
    assert all(fields[k].default == v for k, v in DEFAULTS.items())


def test_the_set_is_class_sorted(class_sorted):
    _, labels = class_sorted
    assert len(labels) == 2048 and all(len(set(x.tolist())) == 1 for x in labels)
    one_lane = mixing(labels, seed=SEED, generations=[Generation(1, 1, BATCH)], shuffle_buffer=BUFFER, interleave_shards=1)
    assert one_lane["ratio"] < 0.6  # blocks of 1000 consecutive samples: about 34 shards, so 34 classes


@pytest.mark.parametrize("generations", [
    [Generation(1, 1, BATCH)],
    [Generation(4, 2, BATCH)],
    [Generation(4, 2, BATCH, consumed_batches=13)],  # right after a mid-epoch resume
    [Generation(4, 2, BATCH, consumed_batches=13), Generation(3, 2, BATCH)],  # resumed on another world size
    [Generation(1, 1, BATCH, consumed_batches=100), Generation(4, 2, BATCH)],
], ids=["1 rank", "4x2", "4x2 resumed", "4x2 then 3x2", "1 then 4x2"])
def test_micro_batches_hold_as_many_classes_as_iid_draws(class_sorted, generations):
    _, labels = class_sorted
    for rank in range(generations[-1].world):
        m = mixing(labels, seed=SEED, generations=generations, shuffle_buffer=BUFFER, interleave_shards=LANES, rank=rank, batches=8)
        assert m["batches"] == 8 and m["ratio"] >= 0.95, m
        assert m["shard_share_max"] <= 4 / BATCH  # no shard gives more than 4 of 64


def test_the_stream_hands_out_the_measured_order(class_sorted):
    root, labels = class_sorted

    def label(sample):
        return torch.zeros(1), torch.tensor(int(sample["cls"]))

    gens = [Generation(4, 2, BATCH, consumed_batches=13), Generation(3, 2, BATCH)]
    stream = ShardStream(open_shard_set(str(root / "train-{000000..002047}.tar")), label, batch_size=BATCH, rank=1, world_size=3,
                         num_workers=2, seed=SEED, shuffle_buffer=BUFFER, max_bad_fraction=0, lanes=LANES)
    loader = StreamLoader(stream, num_workers=2)
    loader.load_state_dict({"seed": SEED, "epoch": 0, "generations": [g.as_dict() for g in gens[:1]],
                            "order": {"shuffle_buffer": BUFFER, "interleave_shards": LANES}})
    by_position = np.concatenate([labels[k] for k in stream.shard_order(0)])
    measured = [by_position[p].tolist() for p in rank_batches(stream.plan(), rank=1, batches=4)]
    assert [targets.tolist() for _, targets in itertools.islice(iter(loader), 4)] == measured


def test_inspect_reports_mixing(class_sorted, capsys):
    root, _ = class_sorted
    assert main(["inspect", str(root), "--mixing", "--sheet-samples", "0", "--world", "4", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "distinct classes per micro-batch" in x)
    assert "(128 classes)" in line and float(line.rsplit("ratio ", 1)[1]) >= 0.95
    assert "largest share of a micro-batch from one shard: mean 0.0" in out


def test_the_default_shuffle_gives_every_shard_the_global_class_mix(tmp_path):
    src = ImageFolderSource(class_folders(tmp_path / "src", 10, 100))
    tables = {}
    for name, seed in (("shuffled", 0), ("sorted", None)):
        write_source(src, tmp_path / name, prefix="train", samples_per_shard=100, shuffle_seed=seed)
        tables[name] = np.stack([np.bincount(x, minlength=10) for x in shard_labels(tmp_path / name)])
    assert chi2_contingency(tables["shuffled"]).pvalue > 0.01  # shards x classes: independent
    assert chi2_contingency(tables["sorted"] + 1).pvalue < 1e-9  # the test can tell
