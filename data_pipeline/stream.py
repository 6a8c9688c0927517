"""The dataset the trainer streams: exact per-rank batches, seeded order, resumable mid-epoch.

`ShardStream` runs inside DataLoader workers and yields whole batches; `StreamLoader`
wraps the DataLoader in the main process, counts the batches it hands out and turns that
count into a `state_dict()` (see `plan.py` for why the count is enough).
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.decode import BadSample, keep_freed_buffers, seed_sample
from data_pipeline.plan import EpochPlan, Generation, shard_order, slot_order
from data_pipeline.shards import ShardCursor, UnreadableSample, count_samples
from data_pipeline.storage import open_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    lengths: list[int]

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


class TooManyBadSamples(RuntimeError):
    pass


class _Lane:
    """Read position of one lane of a slot: one shard open at a time, read front to back."""

    def __init__(self, shards: ShardSet, order: np.ndarray, starts: np.ndarray, opener: Callable[[str], BinaryIO]):
        self.shards, self.order, self.starts, self.opener = shards, order, starts, opener
        self.open: ShardCursor | None = None

    def read(self, positions: np.ndarray) -> list:
        """Raw samples at `positions` (ascending but for padding), read run by run (runs of consecutive positions)."""
        out: list = []
        i = 0
        while i < len(positions):
            j = i + 1
            while j < len(positions) and positions[j] == positions[j - 1] + 1:
                j += 1
            start, end = int(positions[i]), int(positions[j - 1]) + 1
            while start < end:  # a run may cross shard boundaries
                k = int(np.searchsorted(self.starts, start, "right")) - 1
                url = self.shards.urls[int(self.order[k])]
                take = min(end, int(self.starts[k + 1])) - start
                if self.open is None or self.open.url != url:
                    self.close()
                    self.open = ShardCursor(url, self.opener)
                out.extend(self.open.read(start - int(self.starts[k]), take))
                start += take
            i = j
        return out

    def close(self) -> None:
        if self.open is not None:
            self.open.close()
            self.open = None


class _SlotReader:
    """The lanes of one slot: a block's positions come lane by lane, each lane reads its own shard."""

    def __init__(self, shards: ShardSet, order: np.ndarray, starts: np.ndarray, opener: Callable[[str], BinaryIO]):
        self.shards, self.order, self.starts, self.opener = shards, order, starts, opener
        self.lanes: list[_Lane] = []

    def read(self, positions: np.ndarray, counts: np.ndarray) -> list:
        while len(self.lanes) < len(counts):
            self.lanes.append(_Lane(self.shards, self.order, self.starts, self.opener))
        out: list = []
        at = 0
        for lane, n in zip(self.lanes, counts):
            out.extend(lane.read(positions[at : at + n]))
            at += n
        return out

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()


class ShardStream(IterableDataset):
    def __init__(
        self,
        shards: ShardSet,
        decode: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer: int,
        max_bad_fraction: float,
        lanes: int = 1,
        opener: Callable[[str], BinaryIO] = open_url,
        finish: Callable[[list, list], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        """`decode(raw sample) -> (image, target)`; `finish(images, targets) -> (batch, targets)`
        runs on each batch in the worker (default: stack); `lanes`: shards each slot reads side by side."""
        self.shards, self.decode, self.opener = shards, decode, opener
        self.finish = finish or stack_batch
        if not shards.num_samples:
            raise ValueError(f"the {len(shards.urls)} shard(s) hold no samples ({', '.join(shards.urls[:3])}...): nothing to stream")
        self.rank, self.seed, self.buffer, self.lanes = rank, seed, shuffle_buffer, lanes
        self.max_bad_fraction = max_bad_fraction
        self.epoch = 0
        self.generations = [Generation(world_size, max(num_workers, 1), batch_size)]

    def shard_order(self, epoch: int) -> np.ndarray:
        return shard_order(self.seed, epoch, len(self.shards.urls))

    def plan(self) -> EpochPlan:
        """The current epoch's order (see `plan.py`)."""
        lengths = np.asarray(self.shards.lengths, dtype=np.int64)[self.shard_order(self.epoch)]
        return EpochPlan(lengths, seed=self.seed, epoch=self.epoch, generations=self.generations, lanes=self.lanes, buffer=self.buffer)

    def batches_per_epoch(self) -> int:
        """Batches each rank yields in the current generation (the same on every rank)."""
        gen = self.generations[-1]
        return self.plan().piece(len(self.generations) - 1, 0).length // gen.batch * gen.workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        if info is not None:
            keep_freed_buffers()
        # in the training process itself (num_workers=0) the per-sample seeding must not
        # leak into the trainer's random state: it is swapped out while we decode
        caller = _rng_state() if info is None else None
        gen = self.generations[-1]
        worker = info.id if info is not None else 0
        slot = self.rank * gen.workers + worker
        plan = self.plan()
        piece, blocks = plan.current(slot)
        cursor = _SlotReader(self.shards, self.shard_order(self.epoch), plan.starts, self.opener)
        bad: Counter = Counter()
        seen = 0
        last_good = None
        pending = 0  # bad samples before the first good one, filled once one arrives
        items: list = []  # (image, target, position) of the batch being filled
        try:
            key = plan.key(len(self.generations) - 1, slot)
            for positions, counts, order, first in slot_order(piece, blocks, skip=gen.slot_consumed(slot), key=key):
                raw = cursor.read(positions, counts)
                for idx in order[first:]:
                    sample, position = raw[idx], int(positions[idx])
                    seen += 1
                    # Augmentation drawn from the sample's place in the epoch: a resumed run
                    # augments each remaining sample exactly as an uninterrupted one would.
                    seed_sample(hash((self.seed, self.epoch, position)) & 0x7FFFFFFF)
                    try:
                        if isinstance(sample, UnreadableSample):
                            raise BadSample(sample.reason, str(sample))
                        image, target = self.decode(sample)
                    except BadSample as err:
                        bad[err.reason] += 1
                        log.warning("skipping sample: %s", err)
                        if sum(bad.values()) > max(self.max_bad_fraction * seen, 0) and seen >= 20:
                            raise TooManyBadSamples(
                                f"{sum(bad.values())} of {seen} samples bad ({dict(bad)}) on slot {slot}, over "
                                f"data.max_corrupt_fraction={self.max_bad_fraction}; last: {err}"
                            ) from None
                        if last_good is None:
                            pending += 1
                            continue
                        image, target = last_good  # substitute keeps every rank's batch count equal
                    last_good = image, target
                    items.extend([(image, target, position)] * (pending + 1))
                    pending = 0
                    while len(items) >= gen.batch:
                        batch, items = items[: gen.batch], items[gen.batch :]
                        seed_sample(hash((self.seed, self.epoch, -1, batch[0][2])) & 0x7FFFFFFF)  # mixup's draws
                        images, targets = self.finish([b[0] for b in batch], [b[1] for b in batch])
                        if caller is not None:
                            _set_rng_state(caller)
                        yield images, targets, dict(bad)
                        if caller is not None:
                            caller = _rng_state()
            if pending:
                raise TooManyBadSamples(f"slot {slot} found no decodable sample ({dict(bad)})")
        finally:
            cursor.close()
            if caller is not None:
                _set_rng_state(caller)


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state: tuple) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def stack_batch(images: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack(images), torch.stack(targets)


class StreamLoader:
    """Infinite iterator of (images, targets) across epochs, with a resumable state."""

    def __init__(self, stream: ShardStream, num_workers: int):
        self.stream, self.num_workers = stream, num_workers
        self.bad_counts: Counter = Counter()
        self._worker_bad: dict[int, dict] = {}

    def state_dict(self) -> dict:
        return {
            "seed": self.stream.seed,
            "epoch": self.stream.epoch,
            "generations": [g.as_dict() for g in self.stream.generations],
            "order": self._order(),
            "bad_counts": dict(self.bad_counts),
        }

    def _order(self) -> dict:
        return {"shuffle_buffer": self.stream.buffer, "interleave_shards": self.stream.lanes}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.stream.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, config has {self.stream.seed}")
        gens = [Generation(**g) for g in state["generations"]]
        if state.get("order") != self._order() and any(g.consumed_batches for g in gens):
            raise ValueError(
                f"data state was saved mid-epoch with order {state.get('order')}, config has {self._order()}: "
                "resume with the same data.shuffle_buffer and data.interleave_shards (the epoch's order depends on them)"
            )
        now = self.stream.generations[-1]
        last = gens[-1]
        if (last.world, last.workers, last.batch) != (now.world, now.workers, now.batch) and last.consumed_batches:
            gens.append(replace(now, consumed_batches=0))  # new shape: continue over what is left
        elif (last.world, last.workers, last.batch) != (now.world, now.workers, now.batch):
            gens[-1] = replace(now, consumed_batches=0)
        self.stream.epoch = state["epoch"]
        self.stream.generations = gens
        self.bad_counts = Counter(state.get("bad_counts", {}))

    def _count(self, n: int) -> None:
        gens = self.stream.generations
        gens[-1] = replace(gens[-1], consumed_batches=gens[-1].consumed_batches + n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            loader = DataLoader(
                self.stream, batch_size=None, num_workers=self.num_workers,
                persistent_workers=False, prefetch_factor=2 if self.num_workers else None,
                # its own generator: the loader's base seed is not drawn from the trainer's
                generator=torch.Generator().manual_seed(self.stream.seed),
            )
            base = Counter(self.bad_counts)
            done = self.stream.generations[-1].consumed_batches
            for i, (images, targets, bad) in enumerate(loader):
                self._worker_bad[(done + i) % self.stream.generations[-1].workers] = bad
                self.bad_counts = base + sum((Counter(b) for b in self._worker_bad.values()), Counter())
                self._count(1)
                yield images, targets
            self._worker_bad.clear()
            gen = self.stream.generations[-1]
            self.stream.epoch += 1
            self.stream.generations = [Generation(gen.world, gen.workers, gen.batch)]


def open_shard_set(pattern: str) -> ShardSet:
    """Expand a URL pattern and take each shard's sample count from `_info.json` beside it."""
    import json
    import posixpath

    from data_pipeline.storage import expand_urls

    urls = [u for u in expand_urls(pattern) if u.strip()]
    if not urls:
        raise ValueError(f"data URL pattern {pattern!r} names no shards: give a path, a brace pattern "
                         "(train-{000000..000099}.tar), s3:// or http(s):// URLs")
    lengths: dict[str, int] = {}
    info_url = posixpath.join(posixpath.dirname(urls[0]), "_info.json")
    try:
        with open_url(info_url) as f:
            info = json.load(f)
        for split in info.get("splits", {}).values():
            lengths.update(zip(split["filenames"], split["shard_lengths"]))
    except FileNotFoundError:
        pass
    counts = []
    for url in urls:
        name = posixpath.basename(url)
        if name not in lengths:  # shards written by other tools: count once by reading
            lengths[name] = count_samples(url)
        counts.append(lengths[name])
    return ShardSet(urls, counts)
