"""One pass over a set of images computing every analysis of a model (and, optionally, a reference).

Each batch goes once through each model; hooks reduce attention and layer outputs as they
come (see `capture.recording`), so memory is one batch whatever the number of images.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

from data_pipeline.decode import BadSample, SampleDecoder, build_transform
from data_pipeline.shards import iter_tar_samples
from data_pipeline.storage import open_url
from data_pipeline.stream import open_shard_set
from pretrain.analysis.attention_distance import MeanAttentionDistance
from pretrain.analysis.capture import recording
from pretrain.analysis.cka import ESTIMATORS
from pretrain.analysis.rollout import attention_rollout

log = logging.getLogger(__name__)

MIN_CKA_BATCH = 4  # the unbiased HSIC estimator needs 4 examples


@dataclass
class Subject:
    """A model under analysis and the preprocessing its weights expect."""

    name: str
    model: nn.Module
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @cached_property
    def transform(self):
        return build_transform(self.image_size, "none", self.mean, self.std)

    def batch(self, images: list[Image.Image], device: torch.device) -> torch.Tensor:
        return torch.stack([self.transform(img) for img in images]).to(device)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x * std + mean).clamp(0, 1)

    @property
    def grid(self) -> tuple[int, int] | None:
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        return tuple(grid) if grid is not None else None

    @property
    def num_prefix(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))


@dataclass
class Analysis:
    num_images: int
    attention_layers: list[str]
    attention_distance: list[list[float]]  # per layer, per head, in pixels
    layers: list[str]
    cka: np.ndarray  # (layers, layers)
    reference_layers: list[str] = field(default_factory=list)
    cka_cross: np.ndarray | None = None  # (layers, reference layers)
    rollout_images: torch.Tensor | None = None  # (k, 3, H, W) in [0, 1]
    rollout_maps: torch.Tensor | None = None  # (k, rows, cols) in [0, 1]


def iter_shard_images(pattern: str, limit: int) -> Iterator[Image.Image]:
    """The first `limit` decodable images of the shards, in shard order; broken ones are skipped."""
    decoder = SampleDecoder(transform=None, num_classes=0)  # only its image decoding is used
    taken = bad = 0
    for url in open_shard_set(pattern).urls:
        with open_url(url) as f:
            for sample in iter_tar_samples(f, url):
                if taken >= limit:
                    break
                try:
                    yield decoder.image(sample)
                    taken += 1
                except BadSample as err:
                    bad += 1
                    log.warning("skipping %s", err)
        if taken >= limit:
            break
    if bad:
        log.warning("skipped %d undecodable samples", bad)


def batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


class RolloutInputs:
    """The first `limit` images of the pass and their attention, kept for the rollout figure."""

    def __init__(self, limit: int):
        self.limit = limit
        self.images: list[torch.Tensor] = []
        self.attention: dict[int, list[torch.Tensor]] = {}

    def wanted(self, batch_size: int) -> int:
        return max(0, min(self.limit - sum(len(x) for x in self.images), batch_size))

    def maps(self, *, grid: tuple[int, int] | None, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.images:
            return None
        layers = [torch.cat(self.attention[i]) for i in sorted(self.attention)]
        return torch.cat(self.images), attention_rollout(layers, grid=grid, num_prefix=num_prefix)


def forward_layers(model: nn.Module, x: torch.Tensor, on_attention=None) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """One forward pass: each layer's flattened output, then the attention and layer names."""
    feats: dict[int, torch.Tensor] = {}
    with recording(model, on_attention=on_attention, on_representation=feats.__setitem__) as (attn_names, layer_names):
        model(x)
    return [feats[i] for i in sorted(feats)], attn_names, layer_names


@torch.no_grad()
def analyze(
    subject: Subject,
    image_batches: Iterable[list[Image.Image]],
    *,
    reference: Subject | None = None,
    cka_estimator: str = "minibatch",
    rollout_images: int = 8,
    device: torch.device | str = "cpu",
    total_batches: int | None = None,
) -> Analysis:
    """Attention distance, CKA (within `subject`, and against `reference`) and rollout maps."""
    device = torch.device(device)
    model = subject.model.to(device).eval()
    ref_model = reference.model.to(device).eval() if reference is not None else None
    distance = MeanAttentionDistance((subject.image_size,) * 2, grid=subject.grid, num_prefix=subject.num_prefix)
    cka_self, cka_cross = ESTIMATORS[cka_estimator](), ESTIMATORS[cka_estimator]()
    rollout = RolloutInputs(rollout_images)
    num_images = cka_images = 0
    attn_names = layer_names = ref_names = []
    for images in tqdm(image_batches, total=total_batches, desc=f"analyze {subject.name}", unit="batch"):
        x = subject.batch(images, device)
        keep = rollout.wanted(len(images))

        def on_attention(i: int, probs: torch.Tensor) -> None:
            distance.update(i, probs)
            if keep:
                rollout.attention.setdefault(i, []).append(probs[:keep].cpu())

        feats, attn_names, layer_names = forward_layers(model, x, on_attention)
        if keep:
            rollout.images.append(subject.unnormalize(x[:keep]).cpu())
        num_images += len(images)
        if len(images) < MIN_CKA_BATCH:
            log.warning("CKA leaves out a last batch of %d images (fewer than %d)", len(images), MIN_CKA_BATCH)
            continue
        cka_images += len(images)
        cka_self.update(feats)
        if ref_model is not None:
            ref_feats, _, ref_names = forward_layers(ref_model, reference.batch(images, device))
            cka_cross.update(feats, ref_feats)
    if not cka_images:
        raise ValueError(f"CKA needs a batch of at least {MIN_CKA_BATCH} images; the data gave {num_images} in all")
    images_and_maps = rollout.maps(grid=subject.grid, num_prefix=subject.num_prefix)
    return Analysis(
        num_images=num_images,
        attention_layers=list(attn_names),
        attention_distance=distance.compute(),
        layers=list(layer_names),
        cka=cka_self.compute().cpu().numpy(),
        reference_layers=list(ref_names),
        cka_cross=cka_cross.compute().cpu().numpy() if ref_model is not None else None,
        rollout_images=images_and_maps[0] if images_and_maps else None,
        rollout_maps=images_and_maps[1] if images_and_maps else None,
    )
