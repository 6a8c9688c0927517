"""Hungarian matching of predicted boxes to ground truth (DETR, Carion et al. 2020)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou


def box_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Normalised (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def matching_cost(
    logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor,
    *, cost_class: float, cost_bbox: float, cost_giou: float,
) -> torch.Tensor:
    """(queries, targets) cost of one image: -p(class) + L1 + -GIoU, each weighted."""
    prob = logits.float().softmax(-1)[:, labels]
    l1 = torch.cdist(boxes.float(), target_boxes.float(), p=1)
    giou = generalized_box_iou(box_xyxy(boxes.float()), box_xyxy(target_boxes.float()))
    return cost_bbox * l1 - cost_class * prob - cost_giou * giou


class HungarianMatcher:
    """One optimal assignment per image; unmatched queries stand for "no object"."""

    def __init__(self, *, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("matching costs cannot all be 0")
        self.weights = dict(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`logits` (B, Q, K+1), `boxes` (B, Q, 4); returns per image (query indices, target indices)."""
        sizes = [len(t["labels"]) for t in targets]
        out, empty = [], torch.empty(0, dtype=torch.long)
        if not sum(sizes):
            return [(empty, empty) for _ in targets]
        # One cost matrix of every query against every target of the batch (DETR's way: few large
        # ops instead of many small ones), then one assignment per image on its own block.
        batch, queries = logits.shape[:2]
        cost = matching_cost(logits.flatten(0, 1), boxes.flatten(0, 1), torch.cat([t["labels"] for t in targets]).to(logits.device),
                             torch.cat([t["boxes"] for t in targets]).to(boxes.device), **self.weights)
        blocks = cost.view(batch, queries, -1).cpu().split(sizes, dim=-1)
        for b, block in enumerate(blocks):
            if sizes[b] == 0:
                out.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(block[b].numpy())
            out.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return out
