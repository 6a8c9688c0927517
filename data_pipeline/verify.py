"""`python -m data_pipeline verify ROOT`: read every sample of every shard, check images,
labels and the `_info.json` index, and report each problem with its shard and key. Keeps
going past problems; exits 1 if there was any."""
from __future__ import annotations

import argparse
import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from data_pipeline.sample import BadSample, decode_image, sample_labels
from data_pipeline.shards import iter_tar_samples
from data_pipeline.storage import open_url
from data_pipeline.writer import read_info, shard_urls


@dataclass
class ShardReport:
    url: str
    expected: int
    samples: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (reason, "reason: shard:key: detail")


def check_shard(url: str, expected: int, num_classes: int | None, labels_required: bool) -> ShardReport:
    report = ShardReport(url, expected)
    checks = (decode_image, lambda sample: sample_labels(sample, num_classes or 1 << 62))  # class count if known
    try:
        with open_url(url) as f:
            for sample in iter_tar_samples(f, url):
                report.samples += 1
                for check in checks:
                    try:
                        check(sample)
                    except BadSample as err:
                        if err.reason != "no_label" or labels_required:
                            report.problems.append((err.reason, str(err)))  # names shard and key
    except FileNotFoundError as err:
        report.problems.append(("missing_shard", f"missing_shard: {err}"))
        return report
    except Exception as err:  # tarfile, EOF, connection: the rest of the shard is unreadable
        report.problems.append(("truncated_shard", f"truncated_shard: {url}: unreadable after sample {report.samples}: {err}"))
    if report.samples != expected:
        report.problems.append(("index_mismatch", f"index_mismatch: {url}: _info.json says {expected} samples, the shard has {report.samples}"))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="shard folder with _info.json (path, s3://bucket/prefix or http(s)://)")
    parser.add_argument("--split", action="append", default=None, help="split(s) to check (default: all)")
    parser.add_argument("--processes", type=int, default=1, help="shards checked in parallel")
    parser.add_argument("--unlabelled", action="store_true", help="samples without a label are fine (self-supervised sets)")


def main(args: argparse.Namespace) -> int:
    info = read_info(args.root)
    splits = args.split or list(info["splits"])
    missing = [s for s in splits if s not in info["splits"]]
    if missing:
        raise SystemExit(f"{args.root}/_info.json has no split {', '.join(missing)} (it has {', '.join(info['splits'])})")
    jobs = [(url, n) for s in splits for url, n in zip(shard_urls(args.root, info["splits"][s]), info["splits"][s]["shard_lengths"])]
    check = [(url, n, info.get("num_classes"), not args.unlabelled) for url, n in jobs]
    reasons: Counter = Counter()
    samples = 0
    with ProcessPoolExecutor(max(args.processes, 1), mp_context=multiprocessing.get_context("fork")) as pool:
        for report in tqdm(pool.map(check_shard, *zip(*check)), total=len(check), desc="verify", unit="shard", mininterval=2):
            samples += report.samples
            for reason, detail in report.problems:
                reasons[reason] += 1
                print(f"PROBLEM {detail}")
    expected = sum(n for _, n in jobs)
    print(f"checked {samples} samples (index: {expected}) in {len(jobs)} shards of split(s) {', '.join(splits)}")
    if reasons:
        print("problems: " + ", ".join(f"{reason}={count}" for reason, count in sorted(reasons.items())))
        return 1
    print("no problems")
    return 0
