"""Which samples each (rank, worker) slot reads in an epoch, and in which order.

Written by hand because neither webdataset nor timm's reader_wds gives exact per-rank
counts or a mid-epoch resume. The epoch's *global order* is the shards, permuted with
(seed, epoch), laid end to end; a position is an index into it. The positions still to be
read are a sorted list of [start, end) segments. They are cut into `world * workers`
equal contiguous pieces of a whole number of batches; the last pieces are padded by
repeating the first positions of the list, so every rank yields the same number of
batches (at most `world * workers * batch - 1` samples repeat per epoch). A slot reads its
piece in blocks of `shuffle_buffer` samples and shuffles each block with a seed of
(seed, epoch, generation, slot, block): its order is a pure function of those numbers.

A *generation* is one stretch of an epoch run at one (world, workers, batch). Resume on
the same shape continues the generation and skips what was consumed; resume on another
shape starts a new generation over exactly the positions not yet consumed (padding
excluded), so no sample repeats or goes missing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

Segments = np.ndarray  # (n, 2) int64 rows of [start, end) positions


@dataclass(frozen=True)
class Generation:
    world: int
    workers: int  # slots per rank: max(num_workers, 1)
    batch: int
    consumed_batches: int = 0  # per rank; ranks step in lockstep

    def slot_consumed(self, slot: int) -> int:
        """Samples slot `slot` handed out: the DataLoader takes batches from workers round-robin."""
        worker = slot % self.workers
        n = self.consumed_batches
        return max(0, (n - worker + self.workers - 1) // self.workers) * self.batch

    def as_dict(self) -> dict:
        return asdict(self)


def length(segments: Segments) -> int:
    return int((segments[:, 1] - segments[:, 0]).sum()) if len(segments) else 0


def _cum(segments: Segments) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(segments[:, 1] - segments[:, 0])])


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
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def positions_of(segments: Segments, idx: np.ndarray) -> np.ndarray:
    """Positions of items `idx` of the segments laid end to end."""
    cum = _cum(segments)
    row = np.searchsorted(cum, idx, "right") - 1
    return segments[row, 0] + idx - cum[row]


def merge(segments: Segments) -> Segments:
    """Sort and merge touching or overlapping segments (vectorised: a resume at scale can
    bring one shuffle block of single positions per slot, millions of rows)."""
    if not len(segments):
        return segments
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


def cut_pieces(segments: Segments, n_slots: int, batch: int) -> list[SlotPiece]:
    total = length(segments)
    per_slot = -(-total // (n_slots * batch)) * batch if total else 0
    return [
        SlotPiece(slice_segments(segments, s * per_slot, (s + 1) * per_slot), per_slot, min(max(total - s * per_slot, 0), per_slot))
        for s in range(n_slots)
    ]


def block_permutation(size: int, seed: int, epoch: int, generation: int, slot: int, block: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, generation, slot, block]).permutation(size)


def _unconsumed(piece: SlotPiece, consumed: int, buffer: int, key: tuple[int, int, int, int]) -> Segments:
    """Positions of `piece` not among its first `consumed` items, padding dropped."""
    seed, epoch, generation, slot = key
    if consumed >= piece.length:
        return np.zeros((0, 2), np.int64)
    block, offset = divmod(consumed, buffer)
    start = block * buffer
    parts = []
    if offset:
        size = min(buffer, piece.length - start)
        left = start + block_permutation(size, seed, epoch, generation, slot, block)[offset:]
        left = np.sort(left[left < piece.real])
        pos = positions_of(piece.segments, left)
        parts.append(np.stack([pos, pos + 1], axis=1))
        start += size
    if start < piece.real:
        parts.append(slice_segments(piece.segments, start, piece.real))
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)


def current_pieces(
    total: int, *, seed: int, epoch: int, generations: list[Generation], buffer: int
) -> list[SlotPiece]:
    """The slot pieces of the last generation, replaying earlier ones to find what is left."""
    segments = np.array([[0, total]], dtype=np.int64)
    for g, gen in enumerate(generations[:-1]):
        pieces = cut_pieces(segments, gen.world * gen.workers, gen.batch)
        left = [_unconsumed(p, gen.slot_consumed(s), buffer, (seed, epoch, g, s)) for s, p in enumerate(pieces)]
        segments = merge(np.concatenate(left)) if left else np.zeros((0, 2), np.int64)
    last = generations[-1]
    return cut_pieces(segments, last.world * last.workers, last.batch)


def slot_order(piece: SlotPiece, *, skip: int, buffer: int, key: tuple[int, int, int, int]):
    """Yield (block positions in read order, emission order within the block, first item to emit)."""
    seed, epoch, generation, slot = key
    block = skip // buffer
    while block * buffer < piece.length:
        start = block * buffer
        size = min(buffer, piece.length - start)
        positions = positions_of(piece.segments, np.arange(start, start + size))
        order = block_permutation(size, seed, epoch, generation, slot, block)
        yield positions, order, (skip - start if start <= skip else 0)
        block += 1
