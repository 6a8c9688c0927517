"""Which samples each (rank, worker) slot reads in an epoch, and in which order.

Written by hand because neither webdataset nor timm's reader_wds gives exact per-rank
counts or a mid-epoch resume; the block shuffle follows MosaicML streaming's `py1b`/`py1br`
(shuffle inside blocks of the global order), with one change: streaming downloads whole
shards to a local cache and reads them at random, we read each shard sequentially, so a
block draws from `lanes` shards read side by side instead of from one contiguous span.

The epoch's *global order* is the shards, permuted with (seed, epoch), laid end to end; a
position is an index into it. The positions still to be read are a sorted list of
[start, end) segments. They are cut into `world * workers` equal contiguous pieces of a
whole number of batches; the last pieces are padded by repeating the first positions of
the list, so every rank yields the same number of batches (at most
`world * workers * batch - 1` samples repeat per epoch).

A slot splits its piece into `lanes` stretches at shard boundaries (about equal lengths)
and reads it in `ceil(length / buffer)` blocks; block b takes the same share of every
lane (items [b*n/blocks, (b+1)*n/blocks) of a lane of n items), so all lanes end together,
and is shuffled with a seed of (seed, epoch, generation, slot, block). Each lane is read
front to back: reads inside a shard stay sequential, and on a class-sorted set a block
holds about `lanes` shards (more where shards are shorter than buffer/lanes), not one or
two. Bound per worker: one block of raw samples (at most `buffer + lanes`) and `lanes` open
shards. The order is a pure function of those numbers and the shard lengths.

A *generation* is one stretch of an epoch run at one (world, workers, batch). Resume on
the same shape continues the generation and skips what was consumed; resume on another
shape starts a new generation over exactly the positions not yet consumed (padding
excluded), so no sample repeats or goes missing. A generation's list is never built
whole: a slot computes only its own piece, from per-slot counts of what each slot of the
generation before left (one number per slot) and the few slots its piece overlaps.
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

Segments = np.ndarray  # (n, 2) int64 rows of [start, end) positions
EMPTY = np.zeros((0, 2), np.int64)


@dataclass(frozen=True)
class Generation:
    world: int
    workers: int  # slots per rank: max(num_workers, 1)
    batch: int
    consumed_batches: int = 0  # per rank; ranks step in lockstep

    @property
    def slots(self) -> int:
        return self.world * self.workers

    def slot_consumed(self, slot: int) -> int:
        """Samples slot `slot` handed out: the DataLoader takes batches from workers round-robin."""
        worker = slot % self.workers
        n = self.consumed_batches
        return max(0, (n - worker + self.workers - 1) // self.workers) * self.batch

    def as_dict(self) -> dict:
        return asdict(self)


GOLDEN = (5**0.5 - 1) / 2


def shard_order(seed: int, epoch: int, shards: int) -> np.ndarray:
    """The epoch's shard permutation: shard `order[k]` is the k-th of the global order.

    Shards sorted by frac(u + i * golden ratio), u drawn from (seed, epoch): any run of w
    consecutive shards of the order holds shard indices spread evenly over the whole set
    (gaps of about shards / w, by the three-gap theorem). Neighbouring shards of a written
    set tend to be alike (one class each when written from a class-sorted source with
    --no-shuffle), so a slot's piece and a block's lanes sample the set evenly, not at random."""
    u = np.random.default_rng([seed, epoch]).random()
    return np.argsort((u + np.arange(shards) * GOLDEN) % 1.0, kind="stable")


def length(segments: Segments) -> int:
    return int((segments[:, 1] - segments[:, 0]).sum()) if len(segments) else 0


def _cum(segments: Segments) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(segments[:, 1] - segments[:, 0])]).astype(np.int64)


def slice_segments(segments: Segments, a: int, b: int) -> Segments:
    """Items [a, b) of the segments laid end to end, wrapping around past the end."""
    total = length(segments)
    out = []
    cum = _cum(segments)
    while a < b and total:
        start = a % total
        take = min(b - a, total - start)
        end = start + take
        i = int(np.searchsorted(cum, start, "right")) - 1
        j = int(np.searchsorted(cum, end, "left"))
        sub = segments[i:j].copy()
        sub[0, 0] += start - cum[i]
        sub[-1, 1] -= cum[j] - end
        out.append(sub)
        a += take
    return np.concatenate(out) if out else EMPTY


def positions_of(segments: Segments, idx: np.ndarray) -> np.ndarray:
    """Positions of items `idx` of the segments laid end to end."""
    cum = _cum(segments)
    row = np.searchsorted(cum, idx, "right") - 1
    return segments[row, 0] + idx - cum[row]


def merge(segments: Segments) -> Segments:
    """Sort and merge touching or overlapping segments (vectorised: a resume brings one
    shuffle block of single positions per slot)."""
    if not len(segments):
        return EMPTY
    segments = segments[np.argsort(segments[:, 0], kind="stable")]
    ends = np.maximum.accumulate(segments[:, 1])
    starts_group = np.ones(len(segments), dtype=bool)
    starts_group[1:] = segments[1:, 0] > ends[:-1]
    last_of_group = np.append(np.flatnonzero(starts_group)[1:] - 1, len(segments) - 1)
    return np.stack([segments[starts_group, 0], ends[last_of_group]], axis=1).astype(np.int64)


@dataclass(frozen=True)
class SlotPiece:
    segments: Segments
    length: int  # items in the piece, padding included: a whole number of batches
    real: int  # the first `real` items are not padding


def per_slot(total: int, slots: int, batch: int) -> int:
    return -(-total // (slots * batch)) * batch if total else 0


def real_items(total: int, slots: int, batch: int) -> np.ndarray:
    """Items of each slot's piece that are not padding."""
    per = per_slot(total, slots, batch)
    return np.clip(total - np.arange(slots, dtype=np.int64) * per, 0, per)


# ---------------------------------------------------------------- one slot's read order

def shard_breaks(segments: Segments, starts: np.ndarray) -> np.ndarray:
    """Item indices (of the segments laid end to end) where the next item is in another shard;
    `starts` are the shard boundaries in the global order."""
    if not len(segments):
        return np.zeros(0, np.int64)
    cum = _cum(segments)
    a, b = segments[:, 0], segments[:, 1]
    lo, hi = np.searchsorted(starts, a, "right"), np.searchsorted(starts, b, "left")
    counts = hi - lo  # shard starts strictly inside each segment
    rows = np.repeat(np.arange(len(segments)), counts)
    nth = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    inside = cum[rows] + starts[lo[rows] + nth] - a[rows]
    first_shard = np.searchsorted(starts, a, "right") - 1
    last_shard = np.searchsorted(starts, b - 1, "right") - 1
    between = cum[1:-1][last_shard[:-1] != first_shard[1:]]
    return np.unique(np.concatenate([inside, between])).astype(np.int64)


def lane_bounds(piece: SlotPiece, starts: np.ndarray, lanes: int) -> np.ndarray:
    """[0, ..., piece.length]: `lanes` stretches of about equal length, cut at the shard
    boundaries nearest to equal cuts (fewer lanes when the piece touches fewer shards)."""
    breaks = shard_breaks(piece.segments, starts)
    targets = np.arange(1, lanes, dtype=np.int64) * piece.length // lanes
    cuts = np.zeros(0, np.int64)
    if len(breaks) and len(targets):
        i = np.searchsorted(breaks, targets)
        below, above = breaks[np.maximum(i - 1, 0)], breaks[np.minimum(i, len(breaks) - 1)]
        cuts = np.where(targets - below <= above - targets, below, above)
    return np.unique(np.concatenate([[0], cuts, [piece.length]])).astype(np.int64)


@dataclass(frozen=True)
class SlotBlocks:
    """The blocks a slot reads its piece in: block b is items [b*n/blocks, (b+1)*n/blocks) of each lane."""

    bounds: np.ndarray  # lane bounds, item indices into the piece
    blocks: int

    @classmethod
    def of(cls, piece: SlotPiece, starts: np.ndarray, *, lanes: int, buffer: int) -> "SlotBlocks":
        return cls(lane_bounds(piece, starts, lanes), -(-piece.length // buffer))

    def lane_offsets(self, b: int) -> np.ndarray:
        """Where block b starts in each lane."""
        return np.diff(self.bounds) * b // self.blocks

    def start(self, b: int) -> int:
        """Items read before block b."""
        return int(self.lane_offsets(b).sum())

    def locate(self, item: int) -> int:
        """The block holding read-order item `item`."""
        return bisect.bisect_right(range(self.blocks + 1), item, key=self.start) - 1

    def items(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(piece item indices of block b, lane by lane; how many from each lane)."""
        lo, hi = self.lane_offsets(b), self.lane_offsets(b + 1)
        counts = hi - lo
        firsts = np.repeat(self.bounds[:-1] + lo - np.cumsum(counts) + counts, counts)
        return firsts + np.arange(int(counts.sum())), counts

    def tails(self, b: int) -> np.ndarray:
        """(lanes, 2) piece item ranges read from block b on."""
        return np.stack([self.bounds[:-1] + self.lane_offsets(b), self.bounds[1:]], axis=1)


def block_permutation(size: int, seed: int, epoch: int, generation: int, slot: int, block: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, generation, slot, block]).permutation(size)


def unconsumed(piece: SlotPiece, blocks: SlotBlocks, consumed: int, key: tuple[int, int, int, int]) -> Segments:
    """Positions of `piece` not among its first `consumed` items in read order, padding dropped, sorted."""
    if consumed >= piece.length:
        return EMPTY
    b = blocks.locate(consumed)
    offset = consumed - blocks.start(b)
    parts = []
    if offset:
        idx, _ = blocks.items(b)
        left = idx[block_permutation(len(idx), *key, b)[offset:]]
        pos = positions_of(piece.segments, left[left < piece.real])
        parts.append(np.stack([pos, pos + 1], axis=1))
        b += 1
    for lo, hi in blocks.tails(b):
        if lo < min(hi, piece.real):
            parts.append(slice_segments(piece.segments, int(lo), int(min(hi, piece.real))))
    return merge(np.concatenate(parts)) if parts else EMPTY


def slot_order(piece: SlotPiece, blocks: SlotBlocks, *, skip: int, key: tuple[int, int, int, int]):
    """Yield (block positions in read order, items from each lane, emission order, first item to emit)."""
    b = blocks.locate(skip) if skip < piece.length else blocks.blocks
    while b < blocks.blocks:
        idx, counts = blocks.items(b)
        order = block_permutation(len(idx), *key, b)
        yield positions_of(piece.segments, idx), counts, order, max(skip - blocks.start(b), 0)
        b += 1


# ---------------------------------------------------------------- an epoch over its generations

class EpochPlan:
    """The pieces of an epoch's generations, each built only where asked.

    Generation 0's list is every position; generation g's is what the slots of g-1 left,
    slot after slot (each slot's rest sorted; pieces are ascending, so the list is sorted)."""

    def __init__(self, shard_lengths: np.ndarray, *, seed: int, epoch: int, generations: list[Generation],
                 lanes: int, buffer: int):
        self.starts = np.concatenate([[0], np.cumsum(shard_lengths)]).astype(np.int64)
        self.seed, self.epoch, self.generations = seed, epoch, generations
        self.lanes, self.buffer = lanes, buffer
        self.piece = lru_cache(maxsize=64)(self._piece)
        self._left = lru_cache(maxsize=None)(self._left_counts)

    def total(self, g: int) -> int:
        return int(self.starts[-1]) if g == 0 else int(self._left(g - 1)[-1])

    def key(self, g: int, slot: int) -> tuple[int, int, int, int]:
        return self.seed, self.epoch, g, slot

    def blocks(self, g: int, slot: int) -> SlotBlocks:
        return SlotBlocks.of(self.piece(g, slot), self.starts, lanes=self.lanes, buffer=self.buffer)

    def rest(self, g: int, slot: int) -> Segments:
        """What slot `slot` of generation g left unread."""
        piece = self.piece(g, slot)
        consumed = self.generations[g].slot_consumed(slot)
        return unconsumed(piece, self.blocks(g, slot), consumed, self.key(g, slot))

    def _left_counts(self, g: int) -> np.ndarray:
        """[0, cumulative count of what slots 0, 1, ... of generation g left]."""
        gen = self.generations[g]
        total = self.total(g)
        real = real_items(total, gen.slots, gen.batch)
        consumed = np.array([gen.slot_consumed(s) for s in range(gen.slots)], dtype=np.int64)
        left = np.maximum(real - consumed, 0)  # exact where the piece has no padding
        for s in np.flatnonzero((real > 0) & (real < per_slot(total, gen.slots, gen.batch))):
            left[s] = length(self.rest(g, int(s)))  # padding is read too: count the real rest
        return np.concatenate([[0], np.cumsum(left)]).astype(np.int64)

    def items(self, g: int, a: int, b: int) -> Segments:
        """Items [a, b) of generation g's list (0 <= a <= b <= total)."""
        if g == 0:
            return np.array([[a, b]], np.int64) if b > a else EMPTY
        cum = self._left(g - 1)
        first, last = int(np.searchsorted(cum, a, "right")) - 1, int(np.searchsorted(cum, b, "left"))
        parts = [slice_segments(self.rest(g - 1, s), max(a, cum[s]) - cum[s], min(b, cum[s + 1]) - cum[s])
                 for s in range(first, last) if cum[s + 1] > cum[s]]
        return np.concatenate(parts) if parts else EMPTY

    def _piece(self, g: int, slot: int) -> SlotPiece:
        gen = self.generations[g]
        total = self.total(g)
        per = per_slot(total, gen.slots, gen.batch)
        a, b = slot * per, (slot + 1) * per
        parts = []
        while a < b and total:  # past the end: wrap around (padding)
            start = a % total
            take = min(b - a, total - start)
            parts.append(self.items(g, start, start + take))
            a += take
        return SlotPiece(np.concatenate(parts) if parts else EMPTY, per, int(real_items(total, gen.slots, gen.batch)[slot]))

    def current(self, slot: int) -> tuple[SlotPiece, SlotBlocks]:
        g = len(self.generations) - 1
        return self.piece(g, slot), self.blocks(g, slot)
