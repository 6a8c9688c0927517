"""A pretrained backbone's patch tokens as a feature map under DETR's head, and its training objective."""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.tasks.detection.data import unpack_targets
from pretrain.tasks.detection.head import DETRHead
from pretrain.tasks.detection.losses import SetCriterion


def build_backbone(*, checkpoint: str | None, model: str | None, kwargs: dict, image_size: int,
                   tracking_uri: str | None = None) -> tuple[nn.Module, dict]:
    """The backbone at `image_size`, classifier removed, with its export meta ({} when built fresh).

    An exported model loses its whole pretraining head (tanh pre-logits included) and its
    position embeddings are resampled in 2-D to the new patch grid (`pretrain.checkpoint.weights`).
    """
    if checkpoint is not None:  # any model source: a file, s3://, runs:/, models:/ (pretrain.checkpoint.model_source)
        from pretrain.checkpoint.model_source import local_exported
        from pretrain.checkpoint.weights import load_exported

        with local_exported(checkpoint, tracking_uri=tracking_uri) as path:
            backbone, meta = load_exported(path, image_size=image_size, num_classes=0)
    else:
        from pretrain.models import build_model

        backbone, meta = build_model(model, num_classes=0, img_size=image_size, **kwargs), {}
    backbone.reset_classifier(0)  # unused weights would get no gradient
    return backbone.train(), meta


class Detector(nn.Module):
    """images (B, 3, S, S) -> {"logits", "boxes", "aux": [per earlier decoder layer]}."""

    def __init__(self, backbone: nn.Module, head: DETRHead):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.grid = tuple(backbone.patch_embed.grid_size)  # the patch tokens' (rows, columns)
        self.train_backbone = True  # False: features under no_grad (the frozen first steps)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            tokens = self.backbone.forward_features(images)
        return tokens[:, self.backbone.num_prefix_tokens:]  # drop class/register tokens

    def forward(self, images: torch.Tensor) -> dict:
        return self.head(self.features(images), self.grid)


class DetectionObjective(nn.Module):
    """(images, packed targets) -> (loss, metrics): the module DeepSpeed wraps."""

    def __init__(self, detector: Detector, criterion: SetCriterion, *, aux_loss: bool = True):
        super().__init__()
        self.detector, self.criterion, self.aux_loss = detector, criterion, aux_loss

    def forward(self, images: torch.Tensor, packed: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.detector(images)
        if not self.aux_loss:
            outputs = {**outputs, "aux": []}
        return self.criterion(outputs, unpack_targets(packed))
