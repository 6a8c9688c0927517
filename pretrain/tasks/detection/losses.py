"""DETR's set loss: cross-entropy with a down-weighted no-object class, L1 and GIoU on matched boxes."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou

from pretrain.tasks.detection.matcher import HungarianMatcher, box_xyxy


def global_num_boxes(targets: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """Boxes in the batch of all ranks (at least 1): every rank normalises by the same count."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1.0)


class SetCriterion(nn.Module):
    def __init__(
        self, *, num_classes: int, matcher: HungarianMatcher, eos_coef: float = 0.1,
        ce_weight: float = 1.0, bbox_weight: float = 5.0, giou_weight: float = 2.0,
    ):
        super().__init__()
        self.num_classes, self.matcher, self.eos_coef = num_classes, matcher, eos_coef
        self.weights = {"ce": ce_weight, "bbox": bbox_weight, "giou": giou_weight}

    def layer_losses(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict], num_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted losses of one decoder layer's predictions."""
        matches = self.matcher(logits, boxes, targets)
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)])
        query_idx = torch.cat([q for q, _ in matches])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        target_classes[batch_idx, query_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, matches)]).to(logits.device)
        # Made here, not a buffer: bf16 engines cast buffers, and the loss is computed in fp32.
        class_weight = torch.ones(self.num_classes + 1, device=logits.device)
        class_weight[-1] = self.eos_coef
        ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight=class_weight)

        matched = boxes[batch_idx, query_idx].float()
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, matches)]).to(matched)
        l1 = F.l1_loss(matched, target_boxes, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_xyxy(matched), box_xyxy(target_boxes)))
        return {"ce": ce, "bbox": l1, "giou": (1 - giou).sum() / num_boxes}

    def forward(self, outputs: dict, targets: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted sum over the last layer and every auxiliary layer; metrics are the last layer's."""
        num_boxes = global_num_boxes(targets, outputs["logits"].device)
        last = self.layer_losses(outputs["logits"], outputs["boxes"], targets, num_boxes)
        total = sum(self.weights[k] * v for k, v in last.items())
        for aux in outputs.get("aux", []):
            losses = self.layer_losses(aux["logits"], aux["boxes"], targets, num_boxes)
            total = total + sum(self.weights[k] * v for k, v in losses.items())
        return total, {f"loss_{k}": v.detach() for k, v in last.items()}
