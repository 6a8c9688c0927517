"""`python -m data_pipeline inspect ROOT`: sample counts per split and shard, the label
histogram, and a contact sheet PNG of samples spread over the split."""
from __future__ import annotations

import argparse
import io
import math
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

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


def main(args: argparse.Namespace) -> int:
    info = read_info(args.root)
    names = info.get("class_names")

    def class_name(c: int) -> str:
        return names[c] if names and 0 <= c < len(names) else str(c)

    for name, split in info["splits"].items():
        lengths = np.array(split["shard_lengths"])
        print(f"split {name}: {split['num_samples']} samples in {len(lengths)} shards "
              f"(per shard min {lengths.min()}, median {int(np.median(lengths))}, max {lengths.max()})")
    if info.get("num_classes"):
        print(f"classes: {info['num_classes']}")
    split_name = args.split or next(iter(info["splits"]))
    split = info["splits"][split_name]
    total = split["num_samples"] if args.limit is None else min(args.limit, split["num_samples"])
    wanted = set(np.linspace(0, max(total - 1, 0), min(args.sheet_samples, total)).astype(int).tolist())
    counts: Counter = Counter()
    unlabelled = multi = seen = 0
    thumbs = []
    bar = tqdm(total=total, desc=f"inspect {split_name}", unit="img", mininterval=2)
    for url in shard_urls(args.root, split):
        if seen >= total:
            break
        with open_url(url) as f:
            for sample in iter_tar_samples(f, url):
                labels = raw_labels(sample)
                counts.update(labels)
                unlabelled += not labels
                multi += len(labels) > 1
                if seen in wanted:
                    try:
                        caption = ",".join(class_name(c) for c in labels) or "-"
                        thumbs.append((decode_image(sample), caption))
                    except BadSample as err:
                        print(f"undecodable: {err}")
                seen += 1
                bar.update()
                if seen >= total:
                    break
    bar.close()
    print(f"label histogram of {split_name} ({seen} samples read; {unlabelled} unlabelled, {multi} with several labels):")
    ranked = counts.most_common()
    shown = ranked if len(ranked) <= 2 * args.top else ranked[: args.top] + [None] + ranked[-args.top :]
    width = max((n for _, n in ranked), default=1)
    for entry in shown:
        if entry is None:
            print(f"  ... {len(ranked) - 2 * args.top} more classes ...")
            continue
        c, n = entry
        label = class_name(c)
        print(f"  {c:>6} {label[:24]:<24} {n:>9} {'#' * max(1, round(40 * n / width))}")
    if names:
        print(f"classes with no sample: {sum(1 for c in range(len(names)) if counts[c] == 0)} of {len(names)}")
    if thumbs:
        buf = io.BytesIO()
        contact_sheet(thumbs).save(buf, format="PNG")
        write_atomic(args.sheet, buf.getvalue())
        print(f"contact sheet of {len(thumbs)} samples: {args.sheet}")
    return 0
