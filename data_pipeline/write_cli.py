"""`python -m data_pipeline write`: convert an image collection into WebDataset shards."""
from __future__ import annotations

import argparse

from data_pipeline.sources import SOURCES, SourceOptions, open_source
from data_pipeline.writer import parse_size, write_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=sorted(SOURCES), help="kind of collection")
    parser.add_argument("--input", required=True,
                        help="imagefolder: ROOT/<class>/<images>; imagenet21k-tars: folder of n*.tar; "
                             "label-list: a .csv or .jsonl of path,labels; cifar: cifar-10-batches-py or cifar-100-python "
                             "(or its parent); fashion-mnist: folder of the IDX files")
    parser.add_argument("--output", required=True, help="folder or s3://bucket/prefix for the shards and _info.json")
    parser.add_argument("--split", default="train", help="split name in _info.json (cifar, fashion-mnist: train or test)")
    parser.add_argument("--prefix", default=None, help="shard file prefix (default: the split)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=parse_size, default=None, help="target shard size, e.g. 1GB or 512MiB")
    size.add_argument("--samples-per-shard", type=int, default=None, help="samples per shard (default 1000)")
    parser.add_argument("--quality", type=int, default=None, choices=range(1, 101), metavar="1..100",
                        help="re-encode every image as JPEG at this quality (default: keep the original bytes)")
    parser.add_argument("--processes", type=int, default=1, help="processes writing shards in parallel")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted conversion, keeping finished shards")
    parser.add_argument("--limit", type=int, default=None, help="convert a seeded random subset of N items")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--shuffle-seed", type=int, default=0,
                       help="items are shuffled with this seed before they are cut into shards (default 0)")
    order.add_argument("--no-shuffle", action="store_true", help="keep the source's order (class-sorted sources give one-class shards)")
    parser.add_argument("--synset-map", default=None, help="imagenet21k-tars: synsets in label order (one per line, or JSON)")
    parser.add_argument("--class-names", default=None, help="label-list: class names in label order (one per line, or JSON)")
    parser.add_argument("--image-root", default=None, help="label-list: folder the paths are relative to (default: the list's)")


def main(args: argparse.Namespace) -> int:
    options = SourceOptions(split=args.split, synset_map=args.synset_map, class_names=args.class_names, image_root=args.image_root)
    source = open_source(args.source, args.input, options)
    per_shard = args.samples_per_shard or (None if args.shard_size else 1000)
    info = write_source(
        source, args.output, prefix=args.prefix or args.split, split=args.split, samples_per_shard=per_shard,
        shard_bytes=args.shard_size, quality=args.quality, processes=args.processes, resume=args.resume, limit=args.limit,
        shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
    )
    print(f"wrote {info['num_samples']} samples in {len(info['filenames'])} shards to {args.output}")
    return 0
