"""The unit every source yields and every shard holds."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    ext: str  # "jpg" or "png": the encoded bytes' format, kept as the source had it
    label: int | tuple[int, ...] | None  # one class (i21k-style) or several (JFT-style)
