"""Our shard stream against MosaicML streaming and timm's WebDataset reader, on the same JPEGs.

The photos are data_throughput.py's real JPEG patches, labelled class after class (the order
of an ImageFolder: 32 classes x 64 images by default) and written in that order three
ways from the same bytes: our shards (`write --no-shuffle`, 64 images a shard, so every
shard is one class), and MosaicML's MDS (`streaming.MDSWriter`, shards cut at the same 64
images); timm's reader reads our shards (WebDataset tars). Each loader runs as a user
would, at its defaults, in one process with one torch thread and `num_workers=0`,
producing the same training batches: random-resized crop to 224 px, flip, ImageNet
normalisation, float32, 64 a batch. For each:
  samples/CPU-s  decoded+augmented samples per second of the process's CPU time, one
                 epoch (median of `--repeats`)
  mixing         distinct classes per batch over the epoch / the i.i.d. expectation
  resume         a fresh loader restored from a state taken after 5 batches continues with
                 exactly the batches (ids, and for ours the pixels) of an uninterrupted run
MosaicML streaming pins numpy<2.2, so it runs in its own virtual environment that shares
this one's packages (torch included, unchanged): `--setup` makes it (`.venv-peers`, pip
from PyPI); the MosaicML rows run there, as a child process of this script.

    python bench/data_peers.py --setup     # once
    python bench/data_peers.py [--repeats 3]

Last line: RESULT ours_vs_mosaic=... ours_vs_timm=... mixing_ours=... mixing_mosaic=...
mixing_timm=... resume_ours=... resume_mosaic=...
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PEERS = ROOT / ".venv-peers"
SIZE, BATCH, PER_SHARD, RESUME_AT = 224, 64, 64, 5


def distinct_ratio(batches: list[list[int]]) -> float:
    """Mean distinct classes per batch over the i.i.d. expectation from all labels."""
    labels = np.concatenate(batches)
    _, counts = np.unique(labels, return_counts=True)
    iid = float((1 - (1 - counts / len(labels)) ** BATCH).sum())
    return float(np.mean([len(set(b)) for b in batches if len(b) == BATCH]) / iid)


def timed_epochs(epoch, repeats: int) -> tuple[float, list[list[int]]]:
    """(median samples per CPU-second, the labels of each batch of the last epoch); `epoch(r)` -> label batches."""
    epoch(-1)  # warm-up
    rates, labels = [], []
    for r in range(repeats):
        cpu = time.process_time()
        labels = epoch(r)
        rates.append(sum(map(len, labels)) / (time.process_time() - cpu))
    return statistics.median(rates), labels


# ---------------------------------------------------------------- MosaicML streaming (in .venv-peers)

def mosaic_rows(folder: Path, repeats: int) -> dict:
    import torch
    from PIL import Image
    from streaming import MDSWriter, StreamingDataLoader, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torchvision import transforms as T

    torch.set_num_threads(1)
    labels = json.loads((folder / "labels.json").read_text())
    jpegs = [(folder / "jpegs" / f"{i:06d}.jpg").read_bytes() for i in range(len(labels))]
    limit = int(np.mean([len(j) for j in jpegs]) * PER_SHARD)  # MDS cuts shards by bytes: about 64 images
    with MDSWriter(out=str(folder / "mds"), columns={"jpg": "bytes", "cls": "int", "id": "int"}, size_limit=limit) as out:
        for i, (data, label) in enumerate(zip(jpegs, labels)):
            out.write({"jpg": data, "cls": label, "id": i})
    augment = T.Compose([T.RandomResizedCrop(SIZE, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(),
                         T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    class Images(StreamingDataset):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            return augment(Image.open(__import__("io").BytesIO(s["jpg"])).convert("RGB")), s["cls"], s["id"]

    def loader(seed: int):
        clean_stale_shared_memory()
        ds = Images(local=str(folder / "mds"), batch_size=BATCH, shuffle=True, shuffle_seed=seed)
        return StreamingDataLoader(ds, batch_size=BATCH, num_workers=0)

    def epoch(r: int) -> list[list[int]]:
        return [cls.tolist() for images, cls, _ in loader(r + 1)]

    rate, batches = timed_epochs(epoch, repeats)
    full = [ids.tolist() for _, _, ids in itertools.islice(loader(7), 2 * RESUME_AT)]
    first = loader(7)
    head = [ids.tolist() for _, _, ids in itertools.islice(first, RESUME_AT)]
    state = first.state_dict()
    again = loader(7)
    again.load_state_dict(state)
    rest = [ids.tolist() for _, _, ids in itertools.islice(again, RESUME_AT)]
    return {"rate": rate, "mixing": distinct_ratio(batches), "resume": head + rest == full}


# ---------------------------------------------------------------- ours and timm (this environment)

def ours_rows(pattern: str, repeats: int) -> dict:
    import torch

    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_loader

    def loader(seed: int):
        cfg = DataConfig(train_urls=pattern, batch_size=BATCH, num_workers=0, image_size=SIZE, num_classes=64,
                         augment="inception", normalize="imagenet", seed=seed)
        return build_loader(cfg, rank=0, world_size=1, urls=pattern, train=True)

    def epoch(r: int) -> list[list[int]]:
        stream = loader(r + 1)
        return [t.tolist() for _, t in itertools.islice(iter(stream), stream.stream.batches_per_epoch())]

    rate, batches = timed_epochs(epoch, repeats)
    full = list(itertools.islice(iter(loader(7)), 2 * RESUME_AT))
    first = loader(7)
    head = list(itertools.islice(iter(first), RESUME_AT))
    again = loader(7)
    again.load_state_dict(first.state_dict())
    rest = list(itertools.islice(iter(again), RESUME_AT))
    same = all(torch.equal(a, b) and torch.equal(ta, tb) for (a, ta), (b, tb) in zip(full, head + rest))
    return {"rate": rate, "mixing": distinct_ratio(batches), "resume": same}


def timm_rows(root: str, repeats: int) -> dict:
    import torch
    from timm.data import create_dataset, create_loader

    def epoch(r: int) -> list[list[int]]:
        dataset = create_dataset("wds/peers", root=root, split="train", is_training=True, batch_size=BATCH, seed=r + 1)
        loader = create_loader(dataset, input_size=(3, SIZE, SIZE), batch_size=BATCH, is_training=True, color_jitter=None,
                               interpolation="bilinear", num_workers=0, use_prefetcher=True, device=torch.device("cpu"))
        return [t.tolist() for _, t in loader]

    rate, batches = timed_epochs(epoch, repeats)
    return {"rate": rate, "mixing": distinct_ratio(batches), "resume": False}  # reader_wds keeps no position to resume from


def write_sets(folder: Path, classes: int, per_class: int) -> str:
    """The same JPEGs class after class: our shards (also timm's), and files for the MDS writer."""
    from bench.data_throughput import photo_patches
    from data_pipeline.sample import Sample
    from data_pipeline.writer import write_split

    jpegs = photo_patches(classes * per_class)
    labels = [i // per_class for i in range(len(jpegs))]
    (folder / "jpegs").mkdir(parents=True)
    for i, data in enumerate(jpegs):
        (folder / "jpegs" / f"{i:06d}.jpg").write_bytes(data)
    (folder / "labels.json").write_text(json.dumps(labels))
    write_split((Sample(f"img_{i:06d}", d, "jpg", c) for i, (d, c) in enumerate(zip(jpegs, labels))), folder / "wds",
                prefix="train", samples_per_shard=PER_SHARD)
    return str(folder / "wds" / f"train-{{000000..{(len(jpegs) - 1) // PER_SHARD:06d}}}.tar")


def setup() -> None:
    """.venv-peers: its own site-packages first (mosaicml-streaming, numpy<2.2), then this venv's."""
    import site

    subprocess.run([sys._base_executable, "-m", "venv", str(PEERS)], check=True)
    pth = next(PEERS.glob("lib/python3*/site-packages")) / "zz_vitscale_venv.pth"
    pth.write_text(site.getsitepackages()[0] + "\n")
    subprocess.run([str(PEERS / "bin/python"), "-m", "pip", "install", "-c", str(ROOT / "constraints.txt"),
                    "mosaicml-streaming==0.13.0", "numpy==2.1.3"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help="make .venv-peers with mosaicml-streaming, then stop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--mosaic-rows", default=None, help=argparse.SUPPRESS)  # the child process in .venv-peers
    args = parser.parse_args()
    if args.setup:
        return setup()
    if args.mosaic_rows:
        return print(json.dumps(mosaic_rows(Path(args.mosaic_rows), args.repeats)))
    import torch

    from data_pipeline.decode import keep_freed_buffers

    torch.set_num_threads(1)
    keep_freed_buffers()
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_sets(Path(tmp), args.classes, args.per_class)
        child = subprocess.run([str(PEERS / "bin/python"), __file__, "--mosaic-rows", tmp, "--repeats", str(args.repeats)],
                               capture_output=True, text=True, check=True)
        rows = {"ours": ours_rows(pattern, args.repeats), "mosaic": json.loads(child.stdout.strip().splitlines()[-1]),
                "timm": timm_rows(str(Path(tmp) / "wds"), args.repeats)}
    print(f"{'loader':<10}{'samples/CPU-s':>15}{'mixing':>9}{'resume':>9}")
    for name, row in rows.items():
        print(f"{name:<10}{row['rate']:>15.1f}{row['mixing']:>9.3f}{str(row['resume']):>9}")
    print(f"RESULT ours_vs_mosaic={rows['ours']['rate'] / rows['mosaic']['rate']:.2f} "
          f"ours_vs_timm={rows['ours']['rate'] / rows['timm']['rate']:.2f} mixing_ours={rows['ours']['mixing']:.3f} "
          f"mixing_mosaic={rows['mosaic']['mixing']:.3f} mixing_timm={rows['timm']['mixing']:.3f} "
          f"resume_ours={rows['ours']['resume']} resume_mosaic={rows['mosaic']['resume']}")


if __name__ == "__main__":
    main()
