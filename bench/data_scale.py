"""Planning an epoch at JFT-300M scale, from shard lengths alone (no data is written).

300M samples in 30k shards, 1,024 ranks x 8 workers, batch 64 per rank, the trainer's
default shuffle buffer and lanes. One worker's plan is what each DataLoader worker builds
when an epoch starts: its slot's piece and blocks (`EpochPlan.current`). Then an elastic
resume mid-epoch, 1,024 -> 768 ranks after 40 % of the epoch: the new generation's piece of
one worker, built from what every slot of the old one left. Timed and traced
(`tracemalloc`: numpy's arrays count) in a fresh process each, median of `--repeats`.

Baseline in the same run: MosaicML streaming's way of planning, a global sample-id array of
the epoch (its `get_shuffle_py1e` fills one of 300M int64, 2.4 GB, shared by a node's
workers), measured here as the allocation of that array and one permutation of it, at 1/10
scale (30M samples), extrapolated linearly.

    python bench/data_scale.py [--repeats 3]

Last line: RESULT plan_s=<s> plan_mib=<MiB> resume_plan_s=<s> resume_plan_mib=<MiB> (goal: each
under 5 s and 50 MiB)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.mixing import DEFAULTS  # noqa: E402
from data_pipeline.plan import EpochPlan, Generation, shard_order  # noqa: E402

SAMPLES, SHARDS, RANKS, NEW_RANKS, WORKERS, BATCH = 300_000_000, 30_000, 1024, 768, 8, 64


def shard_lengths() -> np.ndarray:
    """30k shards of uneven length (a byte-size target cuts them so), 300M in all."""
    lengths = np.random.default_rng(0).integers(9_000, 11_000, SHARDS)
    lengths[-1] += SAMPLES - lengths.sum()
    return lengths


def one_plan(kind: str, slot: int, queue) -> None:
    """In a fresh process: time and peak traced memory of one worker's plan."""
    lengths = shard_lengths()[shard_order(0, 0, SHARDS)]
    per_rank = SAMPLES // RANKS // BATCH * 4 // 10  # 40 % of the epoch's batches
    gens = [Generation(RANKS, WORKERS, BATCH)]
    if kind == "resume":
        gens = [Generation(RANKS, WORKERS, BATCH, consumed_batches=per_rank), Generation(NEW_RANKS, WORKERS, BATCH)]
    tracemalloc.start()
    start = time.perf_counter()
    plan = EpochPlan(lengths, seed=0, epoch=0, generations=gens, lanes=DEFAULTS["interleave_shards"], buffer=DEFAULTS["shuffle_buffer"])
    piece, blocks = plan.current(slot)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    queue.put({"s": seconds, "mib": peak / 2**20, "piece": piece.length, "segments": len(piece.segments), "lanes": len(blocks.bounds) - 1})


def global_id_array(queue) -> None:
    """The baseline's core step at 1/10 scale: an epoch's sample ids, permuted."""
    tracemalloc.start()
    start = time.perf_counter()
    ids = np.arange(SAMPLES // 10, dtype=np.int64)
    np.random.default_rng(0).shuffle(ids)
    queue.put({"s": (time.perf_counter() - start) * 10, "mib": tracemalloc.get_traced_memory()[1] / 2**20 * 10})


def measure(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=target, args=(*args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    for name, target, extra in (("plan", one_plan, ("plan", RANKS * WORKERS - 1)),
                                ("resume_plan", one_plan, ("resume", NEW_RANKS * WORKERS - 1)),
                                ("global_id_array", global_id_array, ())):
        runs = [measure(target, *extra) for _ in range(args.repeats)]
        rows[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name:<16} {json.dumps({k: round(v, 3) for k, v in rows[name].items()})}")
    print("(plan: last worker of the last rank, whose piece wraps into padding; resume_plan: the same after 1024 -> 768 ranks;"
          " global_id_array: a MosaicML-style epoch id array, extrapolated from 30M samples)")
    print(f"RESULT plan_s={rows['plan']['s']:.3f} plan_mib={rows['plan']['mib']:.1f} "
          f"resume_plan_s={rows['resume_plan']['s']:.3f} resume_plan_mib={rows['resume_plan']['mib']:.1f} "
          f"baseline_id_array_s={rows['global_id_array']['s']:.1f} baseline_id_array_mib={rows['global_id_array']['mib']:.0f}")


if __name__ == "__main__":
    main()
