"""COCO mAP of a detector with pycocotools, and a PNG of its predictions."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchvision.ops import box_convert
from tqdm import tqdm

from pretrain.tasks.detection.data import unpack_targets


def postprocess(logits: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor) -> list[dict[str, np.ndarray]]:
    """DETR's inference: every query is a detection, scored by its best object class;
    boxes in pixels (x, y, w, h) of the original image size (w, h) per image."""
    prob = logits.float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    xywh = box_convert(boxes.float(), "cxcywh", "xywh") * sizes[:, None, :].repeat(1, 1, 2).to(boxes.device)
    return [{"scores": s.cpu().numpy(), "labels": lab.cpu().numpy(), "boxes": b.cpu().numpy()} for s, lab, b in zip(scores, labels, xywh)]


def ground_truth(packed: torch.Tensor) -> list[dict[str, np.ndarray]]:
    out = []
    for t in unpack_targets(packed):
        w, h = t["size"].tolist()
        boxes = box_convert(t["boxes"], "cxcywh", "xywh") * torch.tensor([w, h, w, h])
        out.append({"labels": t["labels"].numpy(), "boxes": boxes.numpy(), "size": (w, h)})
    return out


def coco_map(predictions: list[dict], truths: list[dict], num_classes: int) -> dict[str, float]:
    """mAP@[.5:.95] and mAP@.5 (pycocotools' COCOeval) of per-image predictions against truths."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # pycocotools treats id 0 as "no match", so image, category and annotation ids start at 1.
    images, annotations, results = [], [], []
    for i, (pred, truth) in enumerate(zip(predictions, truths), start=1):
        w, h = truth["size"]
        images.append({"id": i, "width": w, "height": h})
        for label, box in zip(truth["labels"], truth["boxes"]):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label) + 1,
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
        for score, label, box in zip(pred["scores"], pred["labels"], pred["boxes"]):
            results.append({"image_id": i, "category_id": int(label) + 1, "bbox": [float(v) for v in box], "score": float(score)})
    if not annotations or not results:
        return {"map": 0.0, "map_50": 0.0}
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c + 1} for c in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    # stats[k] is -1 where a metric has no ground truth (e.g. no small objects): report 0 then.
    return {"map": max(float(coco_eval.stats[0]), 0.0), "map_50": max(float(coco_eval.stats[1]), 0.0)}


@torch.no_grad()
def predict(detector: torch.nn.Module, loader, *, device: torch.device, dtype: torch.dtype = torch.float32,
            keep_images: int = 0, sync: bool = False, progress: bool = True):
    """This rank's (predictions, truths, first `keep_images` input images) over one pass of `loader`.

    `sync`: the ranks step in lock-step (`pretrain.evaluation.lockstep`), as ZeRO-3 needs.
    """
    from pretrain.evaluation.common import lockstep  # here: pretrain.evaluation imports this module

    was_training = detector.training
    detector.eval()
    predictions, truths, images = [], [], []
    batches = tqdm(loader, desc="detect eval", unit="batch", disable=not progress, mininterval=2)
    for (pixels, packed), real in lockstep(batches, sync=sync, device=device):
        outputs = detector(pixels.to(device, dtype))
        if not real:
            continue
        predictions += postprocess(outputs["logits"], outputs["boxes"], packed[:, 0, 1:3])
        truths += ground_truth(packed)
        if sum(len(b) for b in images) < keep_images:
            images.append(pixels[: keep_images - sum(len(b) for b in images)])
    detector.train(was_training)
    return predictions, truths, (torch.cat(images) if images else torch.zeros(0))


def gather_to_main(items: list) -> list:
    """Concatenate every rank's list on rank 0 (others get [])."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return [x for part in gathered for x in part] if gathered is not None else []


def plot_predictions(images: torch.Tensor, predictions: list[dict], truths: list[dict], path: str | Path, *,
                     mean, std, class_names: list[str], score_threshold: float = 0.5) -> Path:
    """Grid of images: ground truth dashed green, predictions above `score_threshold` red with scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    pixels = (images.float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, pred, truth in zip(axes.flat, pixels, predictions, truths):
        side = img.shape[-1]
        w, h = truth["size"]
        scale = np.array([side / w, side / h, side / w, side / h])  # original pixels -> displayed pixels
        ax.imshow(img.permute(1, 2, 0).numpy())
        # imshow centres pixel i at i: box edges sit half a pixel before
        for box in truth["boxes"] * scale:
            ax.add_patch(Rectangle(box[:2] - 0.5, box[2], box[3], fill=False, color="lime", linestyle="--", linewidth=1.5))
        for score, label, box in zip(pred["scores"], pred["labels"], pred["boxes"] * scale):
            if score >= score_threshold:
                ax.add_patch(Rectangle(box[:2] - 0.5, box[2], box[3], fill=False, color="red", linewidth=1.5))
                ax.text(box[0], box[1], f"{class_names[label]} {score:.2f}", color="white", fontsize=7,
                        bbox={"facecolor": "red", "alpha": 0.6, "pad": 1, "linewidth": 0})
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
