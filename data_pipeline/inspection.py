"""`python -m data_pipeline inspect ROOT`: sample counts per split and shard, the label
histogram, a contact sheet PNG of samples spread over the split, and with `--mixing` how
well the trainer's order mixes the split (see `mixing.py`)."""
from __future__ import annotations

import argparse
import io
import math
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from data_pipeline.mixing import DEFAULTS, mixing
from data_pipeline.plan import Generation
from data_pipeline.sample import BadSample, decode_image, raw_labels
from data_pipeline.shards import iter_tar_samples
from data_pipeline.storage import open_url, write_atomic
from data_pipeline.writer import read_info, shard_urls

THUMB = 112


def contact_sheet(images: list[tuple[Image.Image, str]], columns: int = 8) -> Image.Image:
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * THUMB, rows * (THUMB + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(images):
        x, y = i % columns * THUMB, i // columns * (THUMB + 14)
        thumb = ImageOps.contain(img, (THUMB, THUMB))  # small images (28 px) are scaled up too
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        draw.text((x + 2, y + THUMB), caption[:18], fill="black")
    return sheet


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="shard folder with _info.json (path, s3://bucket/prefix or http(s)://)")
    parser.add_argument("--split", default=None, help="split for the histogram and sheet (default: the first)")
    parser.add_argument("--sheet", default="contact_sheet.png", help="contact sheet PNG to write")
    parser.add_argument("--sheet-samples", type=int, default=48)
    parser.add_argument("--limit", type=int, default=None, help="read at most N samples for the histogram")
    parser.add_argument("--top", type=int, default=10, help="classes listed at each end of the histogram")
    mix = parser.add_argument_group("mixing (defaults: the trainer's data: section)")
    mix.add_argument("--mixing", action="store_true", help="distinct classes per micro-batch vs i.i.d., largest share of one shard")
    mix.add_argument("--world", type=int, default=1, help="ranks")
    mix.add_argument("--workers", type=int, default=DEFAULTS["num_workers"], help="data.num_workers")
    mix.add_argument("--batch", type=int, default=DEFAULTS["batch_size"], help="data.batch_size (micro-batch per rank)")
    mix.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="data.seed")
    mix.add_argument("--shuffle-buffer", type=int, default=DEFAULTS["shuffle_buffer"], help="data.shuffle_buffer")
    mix.add_argument("--interleave-shards", type=int, default=DEFAULTS["interleave_shards"], help="data.interleave_shards")
    mix.add_argument("--mixing-batches", type=int, default=200, help="micro-batches of rank 0 measured")


@dataclass
class SplitScan:
    """What one pass over a split's shards found."""

    counts: Counter = field(default_factory=Counter)
    shard_labels: list[np.ndarray] = field(default_factory=list)  # first label of each sample, per shard
    thumbs: list = field(default_factory=list)
    unlabelled: int = 0
    multi: int = 0
    seen: int = 0


def scan_split(root: str, split: dict, *, total: int, wanted: set[int], caption) -> SplitScan:
    """Labels of the split's first `total` samples; thumbnails of samples `wanted`. A shard that
    cannot be read through is a ValueError naming it (`verify` lists every problem)."""
    scan = SplitScan()
    bar = tqdm(total=total, desc=f"inspect {split['name']}", unit="img", mininterval=2)
    for url in shard_urls(root, split):
        if scan.seen >= total:
            break
        firsts: list[int] = []
        try:
            with open_url(url) as f:
                for sample in iter_tar_samples(f, url):
                    try:
                        labels = raw_labels(sample)
                    except (ValueError, TypeError):  # an unparsable label counts as none here; verify names it
                        labels = []
                    scan.counts.update(labels)
                    scan.unlabelled += not labels
                    scan.multi += len(labels) > 1
                    firsts.append(labels[0] if labels else -1)
                    if scan.seen in wanted:
                        try:
                            scan.thumbs.append((decode_image(sample), caption(labels)))
                        except BadSample as err:
                            print(f"undecodable: {err}")
                    scan.seen += 1
                    bar.update()
                    if scan.seen >= total:
                        break
        except (tarfile.TarError, EOFError, OSError) as err:  # a cut or corrupt tar, a missing shard
            raise ValueError(f"shard {url} is unreadable after {len(firsts)} samples ({err}); "
                             "`python -m data_pipeline verify` lists every problem") from None
        scan.shard_labels.append(np.array(firsts, dtype=np.int64))
    bar.close()
    return scan


def print_histogram(scan: SplitScan, split_name: str, names: list[str] | None, top: int) -> None:
    def class_name(c: int) -> str:
        return names[c] if names and 0 <= c < len(names) else str(c)

    print(f"label histogram of {split_name} ({scan.seen} samples read; {scan.unlabelled} unlabelled, {scan.multi} with several labels):")
    ranked = scan.counts.most_common()
    shown = ranked if len(ranked) <= 2 * top else ranked[:top] + [None] + ranked[-top:]
    width = max((n for _, n in ranked), default=1)
    for entry in shown:
        if entry is None:
            print(f"  ... {len(ranked) - 2 * top} more classes ...")
            continue
        c, n = entry
        print(f"  {c:>6} {class_name(c)[:24]:<24} {n:>9} {'#' * max(1, round(40 * n / width))}")
    if names:
        print(f"classes with no sample: {sum(1 for c in range(len(names)) if scan.counts[c] == 0)} of {len(names)}")


def print_mixing(scan: SplitScan, args: argparse.Namespace) -> None:
    gens = [Generation(args.world, max(args.workers, 1), args.batch)]
    m = mixing(scan.shard_labels, seed=args.seed, generations=gens, shuffle_buffer=args.shuffle_buffer,
               interleave_shards=args.interleave_shards, batches=args.mixing_batches)
    print(f"mixing over {m['batches']} micro-batches of {m['batch']} (rank 0 of {args.world} x {max(args.workers, 1)} workers, "
          f"shuffle_buffer {args.shuffle_buffer}, interleave_shards {args.interleave_shards}):")
    print(f"  distinct classes per micro-batch {m['distinct']:.1f}, i.i.d. expectation {m['iid']:.1f} "
          f"({m['classes']} classes): ratio {m['ratio']:.3f}")
    print(f"  largest share of a micro-batch from one shard: mean {m['shard_share']:.3f}, worst {m['shard_share_max']:.3f}")


def main(args: argparse.Namespace) -> int:
    info = read_info(args.root)
    names = info.get("class_names")
    for name, split in info["splits"].items():
        lengths = np.array(split["shard_lengths"])
        print(f"split {name}: {split['num_samples']} samples in {len(lengths)} shards "
              f"(per shard min {lengths.min()}, median {int(np.median(lengths))}, max {lengths.max()})")
    if info.get("num_classes"):
        print(f"classes: {info['num_classes']}")
    split_name = args.split or next(iter(info["splits"]))
    if split_name not in info["splits"]:
        raise ValueError(f"{args.root} has no split {split_name!r} (it has {', '.join(info['splits'])}); pass --split NAME")
    split = info["splits"][split_name] | {"name": split_name}
    if args.mixing and args.limit is not None:
        raise ValueError("--mixing reads every label of the split: drop --limit")
    total = split["num_samples"] if args.limit is None else min(args.limit, split["num_samples"])
    wanted = set(np.linspace(0, max(total - 1, 0), min(args.sheet_samples, total)).astype(int).tolist())

    def caption(labels: list[int]) -> str:
        return ",".join(names[c] if names and 0 <= c < len(names) else str(c) for c in labels) or "-"

    scan = scan_split(args.root, split, total=total, wanted=wanted, caption=caption)
    print_histogram(scan, split_name, names, args.top)
    if scan.thumbs:
        buf = io.BytesIO()
        contact_sheet(scan.thumbs).save(buf, format="PNG")
        write_atomic(args.sheet, buf.getvalue())
        print(f"contact sheet of {len(scan.thumbs)} samples: {args.sheet}")
    if args.mixing:
        print_mixing(scan, args)
    return 0
