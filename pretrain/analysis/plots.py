"""PNG figures of the analyses; each is written under a temp name and renamed."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_attention_distance(distances: Sequence[Sequence[float]], path: str | Path, *, title: str) -> Path:
    """The ViT paper's scatter: layer on x, one dot per head, mean attention distance on y."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for layer, heads in enumerate(distances, start=1):
        ax.scatter(np.full(len(heads), layer), heads, s=14, alpha=0.7, color="tab:blue")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(range(1, len(distances) + 1))
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    return _save(fig, path)


def plot_cka(matrix: np.ndarray, path: str | Path, *, xlabel: str, ylabel: str, title: str) -> Path:
    """Heatmap of a (layers of y) x (layers of x) CKA matrix, layer 1 at the bottom left."""
    fig, ax = plt.subplots(figsize=(5, 4.3))
    im = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto",
                   extent=(0.5, matrix.shape[1] + 0.5, 0.5, matrix.shape[0] + 0.5))
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def plot_rollout(images: torch.Tensor, maps: torch.Tensor, path: str | Path, *, title: str) -> Path:
    """Top row the images, bottom row the rollout map upsampled and laid over each.

    `images` are (B, 3, H, W) in [0, 1]; `maps` (B, rows, cols) in [0, 1].
    """
    b, _, h, w = images.shape
    heat = F.interpolate(maps[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    fig, axes = plt.subplots(2, b, figsize=(1.8 * b, 3.8), squeeze=False)
    for i in range(b):
        img = images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        axes[0, i].imshow(img)
        axes[1, i].imshow(img)
        axes[1, i].imshow(heat[i].cpu().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)
