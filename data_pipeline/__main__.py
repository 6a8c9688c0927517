"""`python -m data_pipeline write|inspect|verify ...`"""
from __future__ import annotations

import argparse
import sys

from data_pipeline import sources
from data_pipeline.writer import write_split


def _write(args: argparse.Namespace) -> None:
    if args.source == "fashion-mnist":
        samples = sources.fashion_mnist(args.input, args.split, args.limit)
        class_names = sources.FASHION_MNIST_CLASSES
        total = args.limit
    else:
        raise SystemExit(f"unknown source {args.source!r}")
    info = write_split(
        samples, args.output, prefix=args.prefix or args.split, split=args.split,
        samples_per_shard=args.samples_per_shard, class_names=class_names, total=total,
    )
    print(f"wrote {info['num_samples']} samples in {len(info['filenames'])} shards to {args.output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="convert an image collection into WebDataset shards")
    w.add_argument("--source", required=True, choices=["fashion-mnist"])
    w.add_argument("--input", required=True, help="folder of the source collection")
    w.add_argument("--output", required=True, help="folder for the shards and _info.json")
    w.add_argument("--split", default="train")
    w.add_argument("--prefix", default=None, help="shard file prefix (default: the split)")
    w.add_argument("--samples-per-shard", type=int, default=1000)
    w.add_argument("--limit", type=int, default=None, help="convert only the first N samples")
    args = parser.parse_args(argv)
    {"write": _write}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
