"""How well the trainer's order mixes a shard set, computed from the plan and the labels alone.

Two figures per micro-batch: distinct classes against the expectation for i.i.d. draws from
the whole set (sum over classes of 1 - (1 - p_c)^batch), and the largest share of the batch
coming from one shard. A sample's class is its first label (-1 when it has none). The
micro-batches are those a rank takes from its DataLoader: worker after worker, as
`stream.StreamLoader` hands them out, from any generation (so also right after a resume).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from data_pipeline.plan import EpochPlan, Generation, shard_order, slot_order

# The trainer's defaults (DataConfig's; a test keeps them equal), kept here so that
# `inspect` does not import torch.
DEFAULTS = {"batch_size": 64, "num_workers": 0, "shuffle_buffer": 1000, "interleave_shards": 256, "seed": 0}


def emitted(plan: EpochPlan, slot: int) -> Iterator[np.ndarray]:
    """Positions slot `slot` of the plan's last generation hands out, block by block."""
    g = len(plan.generations) - 1
    piece, blocks = plan.current(slot)
    skip = plan.generations[g].slot_consumed(slot)
    for positions, _, order, first in slot_order(piece, blocks, skip=skip, key=plan.key(g, slot)):
        yield positions[order[first:]]


def rank_batches(plan: EpochPlan, *, rank: int, batches: int) -> list[np.ndarray]:
    """Positions of the next `batches` micro-batches of rank `rank` (fewer at the epoch's end)."""
    gen = plan.generations[-1]
    streams: dict[int, Iterator[np.ndarray]] = {}
    pending: dict[int, np.ndarray] = {}
    out = []
    for i in range(gen.consumed_batches, gen.consumed_batches + batches):
        slot = rank * gen.workers + i % gen.workers
        stream = streams.setdefault(slot, emitted(plan, slot))
        have = pending.get(slot, np.zeros(0, np.int64))
        while len(have) < gen.batch:
            block = next(stream, None)
            if block is None:
                return out
            have = np.concatenate([have, block])
        out.append(have[: gen.batch])
        pending[slot] = have[gen.batch :]
    return out


def iid_distinct(labels: np.ndarray, batch: int) -> float:
    """Expected distinct classes in `batch` i.i.d. draws from `labels`."""
    _, counts = np.unique(labels, return_counts=True)
    return float((1 - (1 - counts / len(labels)) ** batch).sum())


def mixing(shard_labels: list[np.ndarray], *, seed: int, epoch: int = 0, generations: list[Generation],
           shuffle_buffer: int, interleave_shards: int, rank: int = 0, batches: int = 200) -> dict:
    """Mixing of rank `rank`'s next `batches` micro-batches; `shard_labels[k]` holds shard k's
    classes in file order."""
    lengths = np.array([len(x) for x in shard_labels], dtype=np.int64)
    order = shard_order(seed, epoch, len(lengths))
    plan = EpochPlan(lengths[order], seed=seed, epoch=epoch, generations=generations, lanes=interleave_shards, buffer=shuffle_buffer)
    labels = np.concatenate([shard_labels[k] for k in order])  # by position in the epoch's global order
    shard_of = np.repeat(order, lengths[order])
    got = rank_batches(plan, rank=rank, batches=batches)
    if not got:
        raise ValueError("no micro-batch left in this epoch to measure")
    batch = generations[-1].batch
    distinct = np.array([len(np.unique(labels[p])) for p in got], dtype=float)
    share = np.array([np.bincount(shard_of[p]).max() / len(p) for p in got])
    iid = iid_distinct(labels, batch)
    return {
        "batches": len(got), "batch": batch, "classes": len(np.unique(labels)), "distinct": float(distinct.mean()),
        "iid": iid, "ratio": float(distinct.mean() / iid), "shard_share": float(share.mean()), "shard_share_max": float(share.max()),
    }
