"""A seeded permutation of [0, n) computed index by index, for shuffling a source before writing.

A bijection rather than `rng.permutation(n)`, because the writer must also convert sources
too large to permute in memory: JFT-300M from a CSV is 300M items, and a permutation array
of them is 2.4 GB in every writing process. Each process instead computes the items of the
shards it writes from (seed, index) alone, so the plan stays fixed up front and the shards
come out byte-identical for any number of processes. A chunked permutation (permute
windows of the listing) would need no more memory either, but mixes only inside a window:
a class-sorted listing would still give shards of a few classes. This one moves any item to
any place.

Construction: a balanced Feistel network over the smallest even number of bits covering
n, with splitmix64's finaliser as the round function; indices that land past n are walked
through the network again until they fall inside (cycle walking, which keeps it a
bijection of [0, n); the domain is under 4n, so fewer than 4 passes on average).
"""
from __future__ import annotations

import numpy as np

ROUNDS = 4  # Luby-Rackoff: four rounds of a pseudo-random function give a pseudo-random permutation
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


class IndexPermutation:
    """`perm(idx)` -> the shuffled index of each item of `idx` (vectorised); a bijection of [0, n)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.n, self.half = n, np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = np.random.SeedSequence([seed, n]).generate_state(ROUNDS, np.uint64)

    def _mix(self, x: np.ndarray, key: np.uint64) -> np.ndarray:
        z = x + key
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
        z &= self.mask
        return z

    def _network(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._mix(right, key)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = self._network(np.asarray(idx, dtype=np.uint64))
            outside = np.flatnonzero(x >= self.n)
            while len(outside):
                x[outside] = self._network(x[outside])
                outside = outside[x[outside] >= self.n]
        return x.astype(np.int64)
