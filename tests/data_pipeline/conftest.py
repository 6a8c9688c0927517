"""Real photos for the data pipeline tests: JPEG patches cut from scikit-learn's two sample
photographs (shipped in the wheel, no download)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def sample_photos() -> list[np.ndarray]:
    """china.jpg and flower.jpg from scikit-learn's wheel, read without importing sklearn (slow)."""
    import importlib.util
    from pathlib import Path

    folder = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]) / "datasets" / "images"
    return [np.asarray(Image.open(folder / name).convert("RGB")) for name in ("china.jpg", "flower.jpg")]


def photo_patches(n: int, *, low: int = 48, high: int = 96, seed: int = 0, quality: int = 90) -> list[bytes]:
    """`n` JPEGs of random sizes in [low, high] px cut from china.jpg and flower.jpg."""
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = (int(v) for v in rng.integers(low, high + 1, 2))
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        buf = io.BytesIO()
        Image.fromarray(photo[y : y + h, x : x + w]).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="session")
def photos() -> list[bytes]:
    return photo_patches(40)
